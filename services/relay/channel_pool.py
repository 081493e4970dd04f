"""ChannelPool: the node's agent channels, one per guest, and the guests that lost theirs for misbehaving."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from services.common.errors import FailedPrecondition, Unavailable
from services.relay.agent_channel import AgentChannel, AgentTarget
from services.relay.channel_guard import ChannelLimits


class ChannelPool:
    """One live channel per guest endpoint, (re)connected on demand: the relay is the only client of a
    guest's agent (virtio-serial serves one connection at a time). A guest whose channel was closed for breaking
    the protocol is not connected to again until its VM starts again (another VMM process): its calls fail
    FAILED_PRECONDITION with the reason, and `on_violation` records it."""

    def __init__(
        self,
        connect_timeout: float,
        limits: ChannelLimits | None = None,
        on_violation: Callable[[AgentTarget, str], Awaitable[None]] | None = None,
        on_connected: Callable[[AgentChannel], Awaitable[None]] | None = None,
        is_paused: Callable[[str], bool] = lambda vm_id: False,
    ) -> None:
        self._is_paused = is_paused
        self._channels: dict[tuple[str, int], AgentChannel] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._connect_timeout = connect_timeout
        self.limits = limits or ChannelLimits()
        self._on_violation = on_violation
        # Run on every new connection before any call uses it (the guest's clock is set there).
        self._on_connected = on_connected
        # (endpoint, generation) -> why the guest lost its channel.
        self.quarantined: dict[tuple[tuple[str, int], int], str] = {}

    def _check_quarantine(self, target: AgentTarget) -> None:
        reason = self.quarantined.get((target.endpoint, target.generation))
        if reason is not None:
            raise quarantine_error(target, reason)

    async def _closed(self, channel: AgentChannel) -> None:
        """Called when a channel's reader ends: a violation quarantines the guest."""
        if channel.violation and (channel.target.endpoint, channel.target.generation) not in self.quarantined:
            self.quarantined[(channel.target.endpoint, channel.target.generation)] = channel.violation
            if self._on_violation is not None:
                await self._on_violation(channel.target, channel.violation)

    def live(self, target: AgentTarget) -> AgentChannel | None:
        channel = self._channels.get(target.endpoint)
        return channel if channel and not channel.is_closed else None

    async def get(self, target: AgentTarget, timeout: float | None = None) -> AgentChannel:
        """The guest's channel, answering; a new connection is tried until `timeout` (default: the connect
        timeout), which covers a guest still booting (its hybrid-vsock listener is not up yet)."""
        self._check_quarantine(target)
        if channel := self.live(target):
            return channel
        lock = self._locks.setdefault(target.endpoint, asyncio.Lock())
        async with lock:
            if channel := self.live(target):
                return channel
            deadline = asyncio.get_running_loop().time() + (timeout or self._connect_timeout)
            while True:
                channel = AgentChannel(target, self.limits, on_closed=self._closed)
                channel.paused = functools.partial(self._channel_paused, channel)
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    await channel.connect(max(0.1, min(remaining, self._connect_timeout)))
                    await channel.wait_until_answering(max(0.1, remaining))
                    break
                except (TimeoutError, Unavailable) as exc:
                    await channel.close()
                    if channel.violation:  # no second chance within this VM's life
                        raise quarantine_error(target, channel.violation) from None
                    if asyncio.get_running_loop().time() + 0.05 >= deadline:
                        raise Unavailable(
                            f"agent of VM {target.vm_id} does not answer: {exc or 'timeout'}",
                            reason="AGENT_UNAVAILABLE",
                        ) from None
                    await asyncio.sleep(0.05)
            if self._on_connected is not None:
                await self._on_connected(channel)
            self._channels[target.endpoint] = channel
            return channel

    def _channel_paused(self, channel: AgentChannel) -> bool:
        return self._is_paused(channel.target.vm_id)  # its current id: a claimed pool VM's channel is renamed

    def rename(self, target: AgentTarget) -> None:
        """The guest behind `target`'s endpoint carries on under another VM id (compute claimed a pooled VM): its
        open channel is kept, so the create does not wait for a new connection and its round trip."""
        if channel := self._channels.get(target.endpoint):
            channel.target = target

    def open_channels(self) -> list[AgentChannel]:
        return [channel for channel in self._channels.values() if not channel.is_closed]

    async def close(self, target: AgentTarget) -> None:
        channel = self._channels.pop(target.endpoint, None)
        self._locks.pop(target.endpoint, None)
        if channel:
            await channel.close()

    async def close_all(self) -> None:
        for channel in list(self._channels.values()):
            await channel.close()
        self._channels.clear()


def quarantine_error(target: AgentTarget, reason: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the agent channel of VM {target.vm_id} was closed because the guest broke the protocol ({reason}); "
        "the VM must be started again",
        reason="AGENT_QUARANTINED",
        metadata={"vm": target.vm_id},
    )
