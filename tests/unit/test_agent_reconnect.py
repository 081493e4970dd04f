"""The guest agent after its host connection dropped (the relay was killed or restarted): the processes of the old
connection are gone, and the next ones have all their output read (found by the chaos suite, tests/standing)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from microvm.agent.v1 import agent_pb2
from services.relay.agent_channel import AgentChannel, AgentTarget
from tests.stack import REPO

pytestmark = pytest.mark.timeout(60)


async def run(channel: AgentChannel, argv: list[str]) -> tuple[bytes, agent_pb2.ExecExited]:
    stream = channel.open_stream()
    await stream.send(exec_start=agent_pb2.ExecStart(argv=argv))
    output = bytearray()
    while True:
        frame = await stream.receive(timeout=10)
        kind = frame.WhichOneof("body")
        if kind == "output":
            output += frame.output.data
            await stream.grant(len(frame.output.data))
        elif kind == "exec_exited":
            await stream.close(cancel=False)
            return bytes(output), frame.exec_exited
        elif kind == "error":
            raise AssertionError(frame.error.message)


async def connected(target: AgentTarget) -> AgentChannel:
    channel = AgentChannel(target)
    await channel.connect(5)
    await channel.wait_until_answering(5)
    return channel


async def test_exec_after_a_dropped_connection_reads_all_its_output(tmp_path):
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "microvm_agent.main", "--unix", socket_path],
        cwd=REPO / "guest_agents" / "linux",
        env=dict(os.environ, PYTHONPATH=str(REPO / "gen" / "python")),
    )
    try:
        while not os.path.exists(socket_path):
            await asyncio.sleep(0.02)
        target = AgentTarget("host", socket_path)
        old = await connected(target)
        for _ in range(3):  # running, output pipes open, when the connection drops
            stream = old.open_stream()
            await stream.send(exec_start=agent_pb2.ExecStart(argv=["sleep", "30"]))
            assert (await stream.receive(timeout=10)).WhichOneof("body") == "exec_started"
        await old.close()
        await asyncio.sleep(0.3)  # the agent notices and ends the old connection's processes

        new = await connected(target)
        try:
            # The new processes get the fd numbers the old ones had.
            results = await asyncio.gather(*(run(new, ["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(6)))
        finally:
            await new.close()
        assert [(output, exited.exit_code) for output, exited in results] == [(f"{i}\n".encode(), 0) for i in range(6)]
    finally:
        agent.kill()
        agent.wait()
