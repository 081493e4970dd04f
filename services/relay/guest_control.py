"""GuestControl: what the node's compute service asks of its guests, through the relay that owns their channels."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable

import structlog
from opentelemetry import trace

from microvm.agent.v1 import agent_pb2
from microvm.relay.v1 import relay_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, error_from_code
from services.common.tasks import cancel_and_wait
from services.relay.agent_channel import AgentTarget
from services.relay.channel_pool import ChannelPool
from services.relay.guest_clock import TOLERANCE_NS, read_offset, set_clock_blind, sync_clock, sync_quietly
from services.relay.vms import NodeVms

HOSTNAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
MAX_TIMEOUT_MS = 600_000
TRACER = trace.get_tracer("microvm.relay")
log = structlog.get_logger()


def _seconds(timeout_ms: int, default: float) -> float:
    if timeout_ms > MAX_TIMEOUT_MS:
        raise InvalidArgument(f"timeout_ms must be at most {MAX_TIMEOUT_MS}")
    return timeout_ms / 1000 if timeout_ms else default


class GuestControl:
    def __init__(
        self,
        vms: NodeVms,
        pool: ChannelPool,
        default_timeout: float,
        on_unconfirmed: Callable[[AgentTarget, str], Awaitable[None]] | None = None,
    ) -> None:
        self.vms, self.pool, self.default_timeout = vms, pool, default_timeout
        # Told of a guest that did not confirm an identity sent with `confirm_later` (the relay records an incident).
        self.on_unconfirmed = on_unconfirmed
        self._confirming: set[asyncio.Task] = set()

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

    async def set_identity(self, vm_id: str, hostname: str, confirm_later: bool = False) -> None:
        """Gives the guest its host name and fresh entropy, and the host's clock. With `confirm_later` it answers
        once they are sent and confirms them in the background (`_confirm`)."""
        if not HOSTNAME.fullmatch(hostname):
            raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")
        # Spans: a warm create waits on this call (bench/breakdown.py shows each part).
        with TRACER.start_as_current_span("relay.vm_record"):
            target = await self.vms.target(vm_id, running=False)
        with TRACER.start_as_current_span("agent_channel.open"):
            channel = await self.pool.get(target)
        with TRACER.start_as_current_span("guest.identity_and_clock"):
            await self._send_identity(channel, hostname)
            if not confirm_later:
                await self._check_clock(channel)
                return
        task = asyncio.get_running_loop().create_task(self._confirm(target, channel), name=f"identity-{vm_id}")
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _send_identity(self, channel, hostname: str) -> None:
        await channel.send(
            agent_pb2.Frame(stream_id=0, set_identity=agent_pb2.SetIdentity(hostname=hostname, entropy=os.urandom(64)))
        )
        # A restored guest (a pooled create, a restore, a fork) has the time of its snapshot: set the host's at once,
        # in the same breath, and let the one ping that confirms both (ordered after them) say whether it is close
        # enough; a create then waits for one round trip to its just-woken guest instead of four.
        await set_clock_blind(channel)

    async def _check_clock(self, channel) -> None:
        reading = await read_offset(channel, self.default_timeout)
        if abs(reading.offset_ns) > TOLERANCE_NS:
            await sync_quietly(channel, self.default_timeout)

    async def _confirm(self, target: AgentTarget, channel) -> None:
        """The guest's answer to the ping behind its identity, awaited after the call returned. A guest that does not
        give it is broken: its channel is closed and an incident recorded, so its sandbox reads FAILED instead of
        looking ready. A VM deleted meanwhile needs nothing said, nor one paused meanwhile (its guest takes the frames
        when it is resumed), nor one whose VMM went away (compute says so: the sandbox reads FAILED with the VM's own
        reason, not as a guest that broke the protocol)."""
        try:
            await self._check_clock(channel)
        except Exception as exc:  # noqa: BLE001 - every way of not answering means the same here
            if target.vm_id not in self.vms.vms or self.vms.is_paused(target.vm_id):
                return
            if channel.closed_by_vm:  # never set by a protocol violation
                # The VM itself went away (its VMM died or was killed): compute reports that, as the VM's failure.
                log.info("guest_identity_unconfirmed_vm_gone", vm=target.vm_id, error=str(exc))
                return
            reason = f"the guest did not confirm its identity after it was claimed: {exc}"
            log.warning("guest_identity_unconfirmed", vm=target.vm_id, error=str(exc))
            if self.on_unconfirmed is not None:
                await self.on_unconfirmed(target, reason)
            await self.pool.close(target)

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

    async def stop_confirming(self) -> None:
        """At shutdown: the confirmations still awaited end (a guest left unconfirmed is no worse than before)."""
        for task in list(self._confirming):
            await cancel_and_wait(task)

    async def close(self, vm_id: str) -> None:
        vm = self.vms.vms.get(vm_id)
        if vm is not None:
            await self.pool.close(await self.vms.target(vm_id, running=False))
