"""The guest's wall clock follows the host's: the relay measures a guest's offset with a ping and sets its clock
when it is off (a restored guest keeps its snapshot's time, a paused one stood still): on connect, on identity
(restore), on SyncGuestClock (resume) and periodically. Against the real agent on this host (simulated: it keeps
the clock it is given as an offset and reports it in its pongs, never touching the host's clock)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from microvm.agent.v1 import agent_pb2
from services.relay.agent_channel import AgentChannel, AgentTarget
from services.relay.channel_pool import ChannelPool
from services.relay.guest_clock import read_offset, sync_all, sync_clock, sync_quietly
from tests.stack import REPO

pytestmark = pytest.mark.timeout(60)
FIVE_MINUTES_NS = 300 * 10**9
GOAL_NS = 50 * 10**6  # the offset a guest may keep (issue 14)


@pytest.fixture
async def agents(tmp_path):
    """Start simulated agents on unix sockets: `start()` -> its target."""
    started: list[subprocess.Popen] = []

    async def start() -> AgentTarget:
        socket_path = str(tmp_path / f"agent-{len(started)}.sock")
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "microvm_agent.main", "--unix", socket_path],
                cwd=REPO / "guest_agents" / "linux",
                env=dict(os.environ, PYTHONPATH=str(REPO / "gen" / "python")),
            )
        )
        while not os.path.exists(socket_path):
            await asyncio.sleep(0.02)
        return AgentTarget(f"vm-{len(started)}", socket_path)

    yield start
    for agent in started:
        agent.kill()
        agent.wait()


async def connected(target: AgentTarget) -> AgentChannel:
    channel = AgentChannel(target)
    await channel.connect(5)
    await channel.wait_until_answering(5)
    return channel


async def set_back(channel: AgentChannel, nanoseconds: int) -> None:
    """What a snapshot taken `nanoseconds` ago leaves: a guest clock that far behind."""
    frame = agent_pb2.Frame(stream_id=0, set_clock=agent_pb2.SetClock(unix_time_ns=time.time_ns() - nanoseconds))
    await channel.send(frame)


async def test_a_guest_five_minutes_behind_is_set_to_within_50_ms(agents):
    channel = await connected(await agents())
    try:
        await set_back(channel, FIVE_MINUTES_NS)
        before, after = await sync_clock(channel, 5)
        assert abs(before.offset_ns + FIVE_MINUTES_NS) < GOAL_NS, before
        assert abs(after.offset_ns) < GOAL_NS, after
        assert abs((await read_offset(channel, 5)).offset_ns) < GOAL_NS
    finally:
        await channel.close()


async def test_a_clock_within_tolerance_is_left_alone(agents):
    channel = await connected(await agents())
    try:
        before, after = await sync_clock(channel, 5)
        assert before is after  # no set_clock sent
    finally:
        await channel.close()


async def test_the_pool_sets_the_clock_on_every_new_connection(agents):
    target = await agents()
    first = await connected(target)
    await set_back(first, FIVE_MINUTES_NS)
    await first.ping(5)
    await first.close()  # as when the relay restarts
    pool = ChannelPool(5, on_connected=lambda channel: sync_quietly(channel, 5))
    try:
        channel = await pool.get(target)
        assert abs((await read_offset(channel, 5)).offset_ns) < GOAL_NS
    finally:
        await pool.close_all()


async def test_the_periodic_sync_reaches_every_open_channel(agents):
    pool = ChannelPool(5)
    try:
        channels = [await pool.get(await agents()) for _ in range(3)]
        for index, channel in enumerate(channels):
            await set_back(channel, (index + 1) * FIVE_MINUTES_NS)
        await sync_all(pool.open_channels(), 5)
        offsets = [(await read_offset(channel, 5)).offset_ns for channel in channels]
        assert all(abs(offset) < GOAL_NS for offset in offsets), offsets
    finally:
        await pool.close_all()


async def test_a_slow_first_round_trip_does_not_leave_the_guest_ahead(agents):
    """After a restore the first ping is slow (the guest's code runs cold under TCG): half of it, added for the set
    frame's transit, put the guest that far ahead (the clean-clone CI: 60 ms after a restore). A second set, on a
    warm round trip, takes it back within the goal."""
    channel = await connected(await agents())
    await set_back(channel, FIVE_MINUTES_NS)
    ping, slow = channel.ping, [0.3]

    async def cold_first(timeout):
        pong = await ping(timeout)
        if slow:
            await asyncio.sleep(slow.pop())  # as if the guest had taken that long to answer
        return pong

    channel.ping = cold_first
    before, after = await sync_clock(channel, 5)
    assert before.round_trip_ns > 300 * 10**6
    assert abs(after.offset_ns) < GOAL_NS, after
    assert abs((await read_offset(channel, 5)).offset_ns) < GOAL_NS
    await channel.close()
