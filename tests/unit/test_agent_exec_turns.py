"""The agent's exec path in few loop turns (issue 19): the process is spawned as its frame is dispatched, a frame
goes to an idle channel at once (what the channel does not take stays in order for the writer), and the exit is
seen on the process's pidfd, whoever reaps it first. The agent runs in this process, on a fake channel."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest_agents" / "linux"))

from microvm.agent.v1 import agent_pb2  # noqa: E402
from microvm_agent.agent import Agent  # noqa: E402
from microvm_agent.framing import FrameDecoder, encode  # noqa: E402


class FakeChannel:
    """Takes up to `room` bytes per immediate write (None: all); the writer's writes are always whole."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.written = bytearray()
        self.immediate = 0
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()

    def write_now(self, buffers) -> list:
        data = b"".join(bytes(b) for b in buffers)
        taken = len(data) if self.room is None else min(self.room, len(data))
        self.written += data[:taken]
        self.immediate += 1
        return [data[taken:]] if taken < len(data) else []

    async def write_buffers(self, buffers) -> None:
        self.written += b"".join(bytes(b) for b in buffers)

    async def read(self, size: int) -> bytes:
        return await self.incoming.get()

    def frames(self) -> list[agent_pb2.Frame]:
        return [agent_pb2.Frame.FromString(body) for body in FrameDecoder().feed(bytes(self.written))]


async def serving(channel: FakeChannel) -> tuple[Agent, asyncio.Task]:
    agent = Agent()
    task = asyncio.create_task(agent.serve(channel))
    while not (agent._writer_idle is not None and not agent._writer_idle.done()):
        await asyncio.sleep(0)  # until the hello is out and the writer waits
    return agent, task


def exec_body(stream_id: int, argv: list[str]) -> bytes:
    return encode(agent_pb2.Frame(stream_id=stream_id, exec_start=agent_pb2.ExecStart(argv=argv)))[4:]


async def until_exited(channel: FakeChannel, stream_id: int) -> agent_pb2.ExecExited:
    for _ in range(1000):
        for frame in channel.frames():
            if frame.stream_id == stream_id and frame.HasField("exec_exited"):
                return frame.exec_exited
        await asyncio.sleep(0.01)
    raise AssertionError("no exit reported")


async def test_the_process_starts_and_its_start_is_sent_before_the_loop_turns():
    channel = FakeChannel()
    agent, task = await serving(channel)
    try:
        agent.dispatch(exec_body(1, ["sh", "-c", "exit 7"]))
        # No await since the dispatch: spawned, and ExecStarted already handed to the channel.
        started = [f for f in channel.frames() if f.HasField("exec_started")]
        assert len(started) == 1 and started[0].exec_started.pid == agent.streams[1].child.pid
        assert channel.immediate == 1
        # No SIGCHLD handler in this process: the exit is the pidfd's to see.
        assert (await until_exited(channel, 1)).exit_code == 7
    finally:
        task.cancel()


async def test_what_the_channel_does_not_take_now_follows_in_order():
    channel = FakeChannel(room=3)  # a few bytes of each immediate write
    agent, task = await serving(channel)
    try:
        agent.dispatch(exec_body(1, ["true"]))
        agent.send(0, pong=agent_pb2.Pong(nonce=5))  # queued behind the rest of ExecStarted: not immediate
        assert channel.immediate == 1
        exited = await until_exited(channel, 1)
        assert exited.exit_code == 0
        kinds = [f.WhichOneof("body") for f in channel.frames()]
        assert kinds == ["hello", "exec_started", "pong", "exec_exited"]
    finally:
        task.cancel()


async def test_an_exit_the_reaper_took_first_is_reported_once():
    channel = FakeChannel()
    agent, task = await serving(channel)
    try:
        agent.dispatch(exec_body(1, ["true"]))
        pid = agent.streams[1].child.pid
        time.sleep(0.3)  # it exits meanwhile; the loop does not turn
        _, status = os.waitpid(pid, 0)  # as PID 1's SIGCHLD reaper does
        agent.child_exited(pid, status)
        assert (await until_exited(channel, 1)).exit_code == 0
        await asyncio.sleep(0.05)
        assert [f.WhichOneof("body") for f in channel.frames()].count("exec_exited") == 1
        assert agent.streams.get(1) is None  # the stream ended, its pidfd closed with it
    finally:
        task.cancel()
