"""NetworkLink: compute's side of the node's network service.

Every VM is attached before its VMM starts (the NIC's TAP must exist) and detached when it is deleted; the
attachment is copied into the VM record (`nic`), from which the relay configures the guest, so a VM restored
from any snapshot runs with its own address.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from microvm.network.v1 import network_pb2, network_pb2_grpc
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import vm_pb2
from services.common import deadlines
from services.common.errors import ServiceError, Unavailable
from services.compute.guests import unavailable

log = structlog.get_logger()


class NetworkLink:
    def __init__(self, context, node: str) -> None:
        self.context = context
        self.node = node

    async def wait_until_registered(self, timeout: float) -> bool:
        """True once this node's network service is registered (it may start after compute)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                self.context.directory.newest("network", self.node)
                return True
            except Unavailable:
                if asyncio.get_running_loop().time() > deadline:
                    return False
                await asyncio.sleep(0.2)

    def _stub(self) -> network_pb2_grpc.NetworkServiceStub:
        return network_pb2_grpc.NetworkServiceStub(
            self.context.channel(self.context.directory.newest("network", self.node).address)
        )

    async def attach(
        self, vm: vm_pb2.VmRecord, policy: network_types.NetworkPolicy | None, from_vm_id: str = ""
    ) -> None:
        """Attaches `vm` (or moves `from_vm_id`'s attachment to it) and records the result in `vm`."""
        request = network_pb2.AttachSandboxRequest(
            sandbox_id=vm.id, policy=policy or network_types.NetworkPolicy(), from_sandbox_id=from_vm_id
        )
        # A restarting network service is back within a second or two. Attaching the same id again is
        # idempotent, so any UNAVAILABLE is retried; a move is not (the caller falls back to another VM).
        reply = await self.context.call_newest(
            "network",
            self.node,
            network_pb2_grpc.NetworkServiceStub,
            "AttachSandbox",
            request,
            timeout=deadlines.CONTROL,
            retry_for=0 if from_vm_id else deadlines.RESTART_WAIT,
            retryable=unavailable,
        )
        attachment = reply.attachment
        vm.nic.CopyFrom(
            vm_pb2.GuestNic(
                tap_device=attachment.tap_device,
                mac_address=attachment.mac_address,
                guest_cidr=attachment.guest_cidr,
                gateway=attachment.gateway,
                dns_servers=attachment.dns_servers,
            )
        )

    async def detach(self, vm_id: str) -> None:
        """Best effort: when the network service is away, its reconciliation removes the attachment."""
        try:
            await self._stub().DetachSandbox(
                network_pb2.DetachSandboxRequest(sandbox_id=vm_id), timeout=deadlines.CONTROL
            )
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            log.warning("network_detach_deferred", vm=vm_id, error=str(exc))
