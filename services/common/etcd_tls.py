"""etcd over mutual TLS: the installation's etcd accepts only clients with a certificate of the installation's CA.

aetcd dials only plain channels; this client differs from it in the channel alone. Before this, anyone who could
reach etcd's port could read the records and write their own (an admin API key, a sandbox on another tenant).
"""

from __future__ import annotations

import asyncio

import aetcd
import grpc
from aetcd import rpc, watcher

from services.common.pki import TLS_CHANNEL_OPTIONS, Identity

# A range read answers in one message: grpc's default 4 MiB receive limit made every read of a kind that grew past it
# fail (auth could not start once the audit log passed 4 MiB). etcdctl lifts the limit the same way.
ETCD_CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)


class TlsEtcdClient(aetcd.Client):
    def __init__(self, host: str, port: int, identity: Identity, timeout: float | None = None) -> None:
        # etcd's certificate names the installation (pki.SERVICE_NAME), whichever address it is reached at.
        super().__init__(
            host=host, port=port, timeout=timeout, options=dict([*TLS_CHANNEL_OPTIONS, *ETCD_CHANNEL_OPTIONS])
        )
        self._credentials = identity.channel_credentials()

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it, as aetcd does
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(
                f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None)
            self._connected.set()
        finally:
            self._is_connecting = False
