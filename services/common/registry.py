"""Service registration and discovery in etcd.

Key layout (see docs/etcd-keys.md): `/microvm/services/<kind>/<instance-id>` -> ServiceRegistration, attached
to a lease that a background task keeps alive. A crashed instance stops refreshing and its key disappears within
the lease TTL; a clean shutdown revokes the lease so the key goes at once. A node service also holds
`/microvm/node-locks/<node>/<kind>` under the same lease: one instance per kind per node.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aetcd
import structlog

from microvm.types.v1 import node_pb2, service_pb2
from services.common.config import CommonSettings, ConfigError, parse_address
from services.common.etcd_tls import ETCD_CHANNEL_OPTIONS, TlsEtcdClient
from services.common.pki import Identity, load_identity
from services.common.records import NODE_LOCKS, SERVICES, Records
from services.common.tasks import cancel_and_wait, process_alive

SERVICES_PREFIX = SERVICES.prefix
log = structlog.get_logger()


def etcd_client(endpoints: list[str], timeout: float = 5.0, identity: Identity | None = None) -> aetcd.Client:
    """A client of the installation's etcd; with `identity` over mutual TLS (what etcd requires when `etcd_tls`)."""
    # aetcd speaks to one endpoint: give it a load-balanced name (a Kubernetes Service) for an etcd cluster.
    host, port = parse_address(endpoints[0], key="etcd_endpoints", allow_zero=False)
    if identity is not None:
        return TlsEtcdClient(host, port, identity, timeout=timeout)
    return aetcd.Client(host=host, port=port, timeout=timeout, options=dict(ETCD_CHANNEL_OPTIONS))


def etcd_identity(common: CommonSettings, kind: str) -> Identity | None:
    """The certificate `kind` presents to etcd, or None where etcd is plain (`etcd_tls: false`)."""
    return load_identity(common.pki_path, kind) if common.etcd_tls else None


@dataclass
class ServiceInstance:
    kind: str
    instance_id: str
    address: str
    pid: int = 0
    started: float = 0.0
    node: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return SERVICES.key(self.kind, self.instance_id).decode()

    def encode(self) -> bytes:
        record = service_pb2.ServiceRegistration(
            address=self.address, pid=self.pid, node=self.node, hostname=socket.gethostname(), metadata=self.metadata
        )
        record.start_time.FromNanoseconds(int(self.started * 1e9))
        return SERVICES.encode(record)

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> ServiceInstance:
        kind, instance_id = SERVICES.parts_of(key)
        record = SERVICES.decode(value, key)
        return cls(
            kind=kind,
            instance_id=instance_id,
            address=record.address,
            pid=record.pid,
            started=record.start_time.ToNanoseconds() / 1e9,
            node=record.node,
            metadata=dict(record.metadata),
        )


class NodeTaken(ConfigError):
    """Another live instance already serves this kind on this node."""


class ServiceRegistration:
    """Keeps one instance registered under a lease until `close()`."""

    def __init__(
        self, client: aetcd.Client, instance: ServiceInstance, ttl: int, on_lost: Callable[[str], None] | None = None
    ) -> None:
        self._client = client
        self.instance = instance
        self._ttl = ttl
        self._lease: aetcd.leases.Lease | None = None
        self._task: asyncio.Task | None = None
        self._locked_node = False
        # Called when this instance lost its node to another one (its lease ran out meanwhile).
        self._on_lost = on_lost

    @property
    def lease(self) -> aetcd.leases.Lease | None:
        """The lease the registration is under now (None before it opened): keys that go with this instance."""
        return self._lease

    async def claim_node(self) -> None:
        """Takes this node's lock for the instance's kind before anything else runs: a second instance of the
        kind on the node (a node id given twice) refuses to start. A predecessor on this host whose process is
        gone (it crashed) is taken over at once; any other holder is waited for one lease TTL (it may be a
        crashed instance on another host) before giving up."""
        self.instance.pid = self.instance.pid or os.getpid()
        records = Records(self._client)
        parts = (self.instance.node, self.instance.kind)
        deadline = time.monotonic() + self._ttl + 1.5
        while True:
            if await self._try_lock():
                self._locked_node = True
                # Kept alive from now on: the service's wiring may take longer than the lease.
                self._task = asyncio.create_task(self._keep_alive(), name=f"lease-keepalive-{self.instance.key}")
                return
            holder = await records.get(NODE_LOCKS, *parts)
            if holder is None:
                continue
            lock = holder.message
            if lock.hostname == socket.gethostname() and not process_alive(lock.pid):
                log.info("node_lock_taken_over", node=self.instance.node, kind=self.instance.kind, pid=lock.pid)
                await records.transaction(
                    compare=[records.unchanged(NODE_LOCKS, holder.revision, *parts)],
                    success=[records.delete_op(NODE_LOCKS, *parts)],
                )
                continue
            if time.monotonic() > deadline:
                raise NodeTaken(
                    f"node {self.instance.node!r} already runs a {self.instance.kind} service "
                    f"(instance {lock.instance_id}, pid {lock.pid} on host {lock.hostname}, "
                    f"serving {lock.address}); stop it, or give this host another node_id"
                )
            await asyncio.sleep(0.2)

    async def _try_lock(self) -> bool:
        """One attempt at the node lock, under a fresh lease that becomes this instance's lease on success."""
        records = Records(self._client)
        lease = await self._client.lease(self._ttl)
        lock = node_pb2.NodeLock(
            instance_id=self.instance.instance_id,
            hostname=socket.gethostname(),
            pid=self.instance.pid,
            address=self.instance.address,
        )
        parts = (self.instance.node, self.instance.kind)
        if await records.transaction(
            compare=[records.unchanged(NODE_LOCKS, 0, *parts)],
            success=[records.put_op(NODE_LOCKS, lock, *parts, lease=lease)],
        ):
            self._lease = lease
            return True
        await lease.revoke()
        return False

    async def open(self) -> None:
        self.instance.pid = self.instance.pid or os.getpid()
        self.instance.started = self.instance.started or time.time()
        if self._lease is None:
            self._lease = await self._client.lease(self._ttl)
        if self._locked_node:  # the address is known now
            await self._publish_lock()
        await self._client.put(self.instance.key.encode(), self.instance.encode(), lease=self._lease)
        if self._task is None:
            self._task = asyncio.create_task(self._keep_alive(), name=f"lease-keepalive-{self.instance.key}")

    async def _publish_lock(self) -> None:
        lock = node_pb2.NodeLock(
            instance_id=self.instance.instance_id,
            hostname=socket.gethostname(),
            pid=self.instance.pid,
            address=self.instance.address,
        )
        await Records(self._client).put(NODE_LOCKS, lock, self.instance.node, self.instance.kind, lease=self._lease)

    async def update_metadata(self, **metadata: str) -> None:
        self.instance.metadata.update(metadata)
        await self._client.put(self.instance.key.encode(), self.instance.encode(), lease=self._lease)

    async def _grant_and_put(self) -> None:
        if self._locked_node:
            if not await self._try_lock():
                # Our lease ran out and another instance took the node meanwhile: it owns the node now.
                log.error("node_taken_over", node=self.instance.node, kind=self.instance.kind)
                if self._on_lost:
                    self._on_lost(f"another {self.instance.kind} instance took node {self.instance.node}")
                return
        else:
            self._lease = await self._client.lease(self._ttl)
        if self.instance.address:  # registered already (else `open` does it)
            await self._client.put(self.instance.key.encode(), self.instance.encode(), lease=self._lease)

    async def _keep_alive(self) -> None:
        interval = max(self._ttl / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that arrives as the refresh
                # completes, and this loop then ran on, so the close that cancelled it waited until its own caller
                # gave up (a 30 s stop in the tests, then an error).
                async with asyncio.timeout(interval * 2):
                    reply = await self._lease.refresh()
                expired = reply is None or reply.TTL <= 0
                if expired:
                    # The lease ran out (etcd restarted or we stalled): register again.
                    log.warning("registration_lease_lost", key=self.instance.key)
                    await self._grant_and_put()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd briefly unreachable: keep trying, the TTL bounds staleness
                log.warning("registration_refresh_failed", key=self.instance.key, error=str(exc))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        lease, self._lease = self._lease, None  # closing twice (a failed start's cleanup) revokes once
        if lease is not None:
            try:
                await asyncio.wait_for(lease.revoke(), timeout=2)
            except Exception as exc:
                log.warning("registration_revoke_failed", key=self.instance.key, error=str(exc))


class ServiceDirectory:
    """A live view of registered instances, kept current by an etcd watch on the prefix."""

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._instances: dict[str, ServiceInstance] = {}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    async def open(self) -> None:
        await self._reload()
        self._task = asyncio.create_task(self._watch_forever(), name="service-directory-watch")

    async def _reload(self) -> int:
        result = await self._client.get_prefix(SERVICES_PREFIX.encode())
        self._instances = {}
        for kv in result:
            try:
                self._instances[kv.key.decode()] = ServiceInstance.decode(kv.key, kv.value)
            except Exception as exc:  # one bad registration must not hide the others
                log.error("registration_unreadable", key=kv.key.decode(errors="replace"), error=str(exc))
        return result.header.revision if result.header else 0

    async def _watch_forever(self) -> None:
        revision = None
        while True:
            try:
                revision = await self._reload()
                async with self._changed:
                    self._changed.notify_all()
                watch = await self._client.watch_prefix(SERVICES_PREFIX.encode(), start_revision=revision + 1)
                async for event in watch:
                    key = event.kv.key.decode()
                    if event.kind == aetcd.rtypes.EventKind.PUT:
                        try:
                            self._instances[key] = ServiceInstance.decode(event.kv.key, event.kv.value)
                        except Exception as exc:
                            log.error("registration_unreadable", key=key, error=str(exc))
                    else:
                        self._instances.pop(key, None)
                    async with self._changed:
                        self._changed.notify_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("service_directory_watch_failed", error=str(exc))
                await asyncio.sleep(0.5)

    def every_instance(self) -> list[ServiceInstance]:
        return sorted(self._instances.values(), key=lambda i: (i.kind, i.instance_id))

    def instances(self, kind: str) -> list[ServiceInstance]:
        return sorted((i for i in self._instances.values() if i.kind == kind), key=lambda i: i.instance_id)

    def newest(self, kind: str, node: str | None = None, avoid: set[str] | frozenset = frozenset()) -> ServiceInstance:
        """The most recently started instance of `kind` (on `node`, for per-node services), preferring those whose
        keys are not in `avoid` (instances a caller just failed to reach); a restarted one may overlap its
        predecessor's registration until that lease expires."""
        from services.common.errors import Unavailable

        instances = [i for i in self.instances(kind) if node is None or i.node == node]
        instances = [i for i in instances if i.key not in avoid] or instances
        if not instances:
            where = "" if node is None else f" on node {node}"
            raise Unavailable(
                f"the {kind} service{where} is not available",
                reason=f"{kind.upper()}_UNAVAILABLE",
                metadata={"node": node} if node else None,
            )
        return max(instances, key=lambda i: i.started)

    async def wait_for(self, kind: str, timeout: float) -> list[ServiceInstance]:
        """Instances of `kind`, waiting up to `timeout` seconds for at least one to appear."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.instances(kind)), timeout)
        return self.instances(kind)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
