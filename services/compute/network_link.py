"""NetworkLink: compute's side of the node's network service, and the guest end of each attachment.

Every VM is attached before its VMM starts (the NIC's TAP must exist), detached when it is deleted; the
agent then gives the guest the attachment's MAC, address, gateway and name servers, so a VM restored from
any snapshot runs with its own.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from microvm.agent.v1 import agent_pb2
from microvm.network.v1 import network_pb2, network_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from services.common.agent_channel import AgentChannel
from services.common.errors import FailedPrecondition, ServiceError, Unavailable, error_from_code
from services.compute.records import VmRecord

log = structlog.get_logger()
CALL_TIMEOUT = 30.0
RESTART_WAIT = 15.0


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

    async def attach(self, vm: VmRecord, policy: sandbox_pb2.NetworkPolicy | None, from_vm_id: str = "") -> None:
        """Attaches `vm` (or moves `from_vm_id`'s attachment to it) and records the result in `vm`."""
        request = network_pb2.AttachSandboxRequest(
            sandbox_id=vm.id, policy=policy or sandbox_pb2.NetworkPolicy(), from_sandbox_id=from_vm_id
        )
        # A restarting network service is back within a second or two. Attaching the same id again is
        # idempotent, so any UNAVAILABLE is retried; a move is not (the caller falls back to another VM).
        reply = await self.context.call_newest(
            "network",
            self.node,
            network_pb2_grpc.NetworkServiceStub,
            "AttachSandbox",
            request,
            timeout=CALL_TIMEOUT,
            retry_for=0 if from_vm_id else RESTART_WAIT,
            retryable=unavailable,
        )
        attachment = reply.attachment
        vm.tap_device, vm.mac_address, vm.guest_cidr = (
            attachment.tap_device,
            attachment.mac_address,
            attachment.guest_cidr,
        )
        vm.gateway, vm.dns_servers = attachment.gateway, list(attachment.dns_servers)

    async def detach(self, vm_id: str) -> None:
        """Best effort: when the network service is away, its reconciliation removes the attachment."""
        try:
            await self._stub().DetachSandbox(network_pb2.DetachSandboxRequest(sandbox_id=vm_id), timeout=CALL_TIMEOUT)
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            log.warning("network_detach_deferred", vm=vm_id, error=str(exc))


def unavailable(error: BaseException) -> bool:
    return isinstance(error, Unavailable) or (
        isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    )


async def configure_guest(vm: VmRecord, timeout: float = 30.0) -> None:
    """Applies the VM's attachment inside the guest (through its agent)."""
    channel = AgentChannel(vm.agent_target)
    await channel.connect(timeout=5)
    try:
        stream = channel.open_stream()
        await stream.send(
            configure_network=agent_pb2.ConfigureNetwork(
                mac_address=vm.mac_address, address_cidr=vm.guest_cidr, gateway=vm.gateway, dns_servers=vm.dns_servers
            )
        )
        frame = await stream.receive(timeout=timeout)
        await stream.close(cancel=False)
        if frame.WhichOneof("body") == "error":
            raise error_from_code(frame.error.code, f"VM {vm.id}: {frame.error.message}", reason="GUEST_NETWORK_FAILED")
        if frame.WhichOneof("body") != "network_configured":
            raise FailedPrecondition(
                f"VM {vm.id}: the agent answered {frame.WhichOneof('body')} to configure_network",
                reason="GUEST_NETWORK_FAILED",
            )
    finally:
        await channel.close()
