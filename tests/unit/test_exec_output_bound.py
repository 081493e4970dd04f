"""A caller that collects an exec's output bounds it (`max_output_bytes`): what is beyond is dropped without
blocking the process, and the exit says it was (`output_truncated`, with the bytes the process wrote). One
chatty command cannot fill a collector's memory. A whole installation (fake VMM)."""

from __future__ import annotations

import uuid

import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
ONE_MIB_OF_LINES = ["seq", "-f", "%015g", "1", "65536"]  # 65536 lines of 16 bytes


async def run(caller, sandbox: str, argv: list[str], limit: int) -> tuple[bytes, api.ProcessExited]:
    request = api.ExecRequest(sandbox=sandbox, process=api.ProcessConfig(argv=argv), max_output_bytes=limit)
    output, exited = b"", None
    async for event in caller.stub.Exec(request, metadata=caller.metadata, timeout=60):
        output += event.stdout + event.stderr
        if event.HasField("exited"):
            exited = event.exited
    return output, exited


@pytest.fixture(scope="module")
async def sandbox(installation):
    caller = await tenant_caller(installation, f"bound-{uuid.uuid4().hex[:6]}")
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    return caller, created.sandbox.name


async def test_output_beyond_the_bound_is_dropped_and_flagged(sandbox):
    caller, name = sandbox
    output, exited = await run(caller, name, ONE_MIB_OF_LINES, limit=1000)
    assert len(output) == 1000 and output.startswith(b"000000000000001\n")
    assert exited.exit_code == 0 and exited.output_truncated and exited.output_bytes == MIB


async def test_without_a_bound_everything_comes_and_nothing_is_flagged(sandbox):
    caller, name = sandbox
    output, exited = await run(caller, name, ONE_MIB_OF_LINES, limit=0)
    assert len(output) == MIB and not exited.output_truncated and exited.output_bytes == MIB
    output, exited = await run(caller, name, ["echo", "short"], limit=1000)
    assert output == b"short\n" and not exited.output_truncated
