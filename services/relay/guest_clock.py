"""GuestClock: keeps each guest's wall clock on the host's.

A guest restored from a snapshot (a pooled create, a restore, a fork) wakes up with the time it was frozen at, and
a paused guest's clock stands still while it is paused. The relay measures a guest's offset with a ping (the pong
carries the guest's CLOCK_REALTIME; the host's time at the middle of the round trip is the reference) and, when
it is off by more than `TOLERANCE_NS`, sets the guest's clock to the host's plus half the round trip. It does so
when it connects to an agent, when compute gives a restored guest its identity or resumes it, and every
`relay.clock_sync_seconds` for every open channel, so drift never accumulates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from microvm.agent.v1 import agent_pb2
from services.common.errors import ServiceError
from services.relay.agent_channel import AgentChannel

log = structlog.get_logger()

# Below this the clock is left alone: resetting it to within a ping's precision would only add jitter.
TOLERANCE_NS = 2_000_000
# Sets of one sync at most: the second corrects the first's estimate of the transit (see `sync_clock`).
MAX_SETS = 3


@dataclass
class ClockReading:
    offset_ns: int  # guest minus host
    round_trip_ns: int


async def read_offset(channel: AgentChannel, timeout: float) -> ClockReading:
    sent = time.time_ns()
    pong = await channel.ping(timeout)
    received = time.time_ns()
    return ClockReading(pong.unix_time_ns - (sent + received) // 2, received - sent)


async def set_clock_blind(channel: AgentChannel) -> None:
    """Sets the guest's clock to the host's now, unmeasured (the frame's own transit makes it late by that much):
    for a guest known to be far off, before the one ping that checks it."""
    await channel.send(agent_pb2.Frame(stream_id=0, set_clock=agent_pb2.SetClock(unix_time_ns=time.time_ns())))


async def sync_clock(channel: AgentChannel, timeout: float) -> tuple[ClockReading, ClockReading]:
    """Measures the guest's offset, sets its clock while it is off (at most `MAX_SETS` times), measuring again after
    each set: (before, after). A set adds half the last round trip for the frame's transit, and the first round trip
    after a restore is mostly the guest running its code cold (under TCG: a hundred ms and more, against a few once
    warm), so a single set left such a guest that much ahead; the next reading's round trip is a warm one."""
    before = reading = await read_offset(channel, timeout)
    for _ in range(MAX_SETS):
        if abs(reading.offset_ns) <= TOLERANCE_NS:
            break
        await channel.send(
            agent_pb2.Frame(
                stream_id=0, set_clock=agent_pb2.SetClock(unix_time_ns=time.time_ns() + reading.round_trip_ns // 2)
            )
        )
        reading = await read_offset(channel, timeout)  # ordered after the set_clock frame on the same channel
    if reading is not before:
        log.info(
            "guest_clock_set",
            vm=channel.target.vm_id,
            offset_before_ms=round(before.offset_ns / 1e6, 3),
            offset_after_ms=round(reading.offset_ns / 1e6, 3),
        )
    return before, reading


async def sync_quietly(channel: AgentChannel, timeout: float) -> None:
    """`sync_clock` where a failure must not fail the caller: a guest that does not answer is the heartbeat's
    business, not the clock's."""
    try:
        await sync_clock(channel, timeout)
    except (TimeoutError, ServiceError, ConnectionError) as exc:
        log.warning("guest_clock_not_synced", vm=channel.target.vm_id, error=str(exc) or type(exc).__name__)


async def sync_all(channels: list[AgentChannel], timeout: float) -> None:
    """Syncs every open channel's guest, a few at a time."""
    limit = asyncio.Semaphore(16)

    async def one(channel: AgentChannel) -> None:
        async with limit:
            await sync_quietly(channel, timeout)

    await asyncio.gather(*(one(channel) for channel in channels if not channel.is_closed))
