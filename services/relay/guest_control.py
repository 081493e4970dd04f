"""GuestControl: what the node's compute service asks of its guests, through the relay that owns their channels."""

from __future__ import annotations

import os
import re

from opentelemetry import trace

from microvm.agent.v1 import agent_pb2
from microvm.relay.v1 import relay_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, error_from_code
from services.relay.channel_pool import ChannelPool
from services.relay.guest_clock import TOLERANCE_NS, read_offset, set_clock_blind, sync_clock, sync_quietly
from services.relay.vms import NodeVms

HOSTNAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
MAX_TIMEOUT_MS = 600_000
TRACER = trace.get_tracer("microvm.relay")


def _seconds(timeout_ms: int, default: float) -> float:
    if timeout_ms > MAX_TIMEOUT_MS:
        raise InvalidArgument(f"timeout_ms must be at most {MAX_TIMEOUT_MS}")
    return timeout_ms / 1000 if timeout_ms else default


class GuestControl:
    def __init__(self, vms: NodeVms, pool: ChannelPool, default_timeout: float) -> None:
        self.vms, self.pool, self.default_timeout = vms, pool, default_timeout

    async def wait_for_agent(self, vm_id: str, timeout_ms: int) -> relay_pb2.WaitForAgentResponse:
        """Connects (again and again while the guest boots) until the agent answers, or the time is up."""
        target = await self.vms.target(vm_id, running=False)
        channel = await self.pool.get(target, timeout=_seconds(timeout_ms, self.default_timeout))
        pong = await channel.ping(self.default_timeout)
        return relay_pb2.WaitForAgentResponse(
            uptime_seconds=pong.uptime_seconds,
            mem_total_kib=pong.mem_total_kib,
            mem_available_kib=pong.mem_available_kib,
            boot_id=pong.boot_id,
            hostname=pong.hostname,
        )

    async def configure_network(self, vm_id: str) -> None:
        vm = await self.vms.get(vm_id)
        if not vm.HasField("nic"):
            raise FailedPrecondition(f"VM {vm_id} has no network attachment", reason="NO_ATTACHMENT")
        channel = await self.pool.get(await self.vms.target(vm_id, running=False))
        stream = channel.open_stream()
        try:
            await stream.send(
                configure_network=agent_pb2.ConfigureNetwork(
                    mac_address=vm.nic.mac_address,
                    address_cidr=vm.nic.guest_cidr,
                    gateway=vm.nic.gateway,
                    dns_servers=vm.nic.dns_servers,
                )
            )
            frame = await stream.receive(timeout=self.default_timeout)
        finally:
            await stream.close(cancel=False)
        if frame.WhichOneof("body") == "error":
            raise error_from_code(frame.error.code, f"VM {vm_id}: {frame.error.message}", reason="GUEST_NETWORK_FAILED")
        if frame.WhichOneof("body") != "network_configured":
            raise FailedPrecondition(
                f"VM {vm_id}: the agent answered {frame.WhichOneof('body')} to configure_network",
                reason="GUEST_NETWORK_FAILED",
            )

    async def set_identity(self, vm_id: str, hostname: str) -> None:
        if not HOSTNAME.fullmatch(hostname):
            raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")
        # Spans: a warm create waits on this call (bench/breakdown.py shows each part).
        with TRACER.start_as_current_span("relay.vm_record"):
            target = await self.vms.target(vm_id, running=False)
        with TRACER.start_as_current_span("agent_channel.open"):
            channel = await self.pool.get(target)
        with TRACER.start_as_current_span("guest.identity_and_clock"):
            await self._send_identity(channel, hostname)

    async def _send_identity(self, channel, hostname: str) -> None:
        await channel.send(
            agent_pb2.Frame(stream_id=0, set_identity=agent_pb2.SetIdentity(hostname=hostname, entropy=os.urandom(64)))
        )
        # A restored guest (a pooled create, a restore, a fork) has the time of its snapshot: set the host's at once,
        # in the same breath, and let the one ping that confirms both (ordered after them) say whether it is close
        # enough; a create then waits for one round trip to its just-woken guest instead of four.
        await set_clock_blind(channel)
        reading = await read_offset(channel, self.default_timeout)
        if abs(reading.offset_ns) > TOLERANCE_NS:
            await sync_quietly(channel, self.default_timeout)

    async def sync_clock(self, vm_id: str) -> relay_pb2.SyncGuestClockResponse:
        channel = await self.pool.get(await self.vms.target(vm_id, running=False))
        before, after = await sync_clock(channel, self.default_timeout)
        return relay_pb2.SyncGuestClockResponse(
            offset_before_ns=before.offset_ns, offset_after_ns=after.offset_ns, round_trip_ns=after.round_trip_ns
        )

    async def run(self, vm_id: str, argv: list[str], timeout_ms: int) -> int:
        if not argv:
            raise InvalidArgument("argv must name a program")
        channel = await self.pool.get(await self.vms.target(vm_id, running=False))
        frame = await channel.run_to_exit(list(argv), timeout=_seconds(timeout_ms, self.default_timeout))
        if frame.WhichOneof("body") == "error":
            raise error_from_code(frame.error.code, f"VM {vm_id}: {frame.error.message}")
        exited = frame.exec_exited
        return -exited.signal if exited.signal else exited.exit_code

    async def close(self, vm_id: str) -> None:
        vm = self.vms.vms.get(vm_id)
        if vm is not None:
            await self.pool.close(await self.vms.target(vm_id, running=False))
