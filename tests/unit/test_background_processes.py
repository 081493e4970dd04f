"""Background processes (E2B `commands` with background=True): started at once with a pid, listed, followed from
their buffered output by any number of callers, fed stdin, signalled; they run on when their follower goes away
and when the relay restarts (the agent keeps them, not a stream). A whole installation (fake VMM: the real agent
runs each sandbox as a host process)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"bg-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def sandbox(caller):
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    return created.sandbox.name


async def start(caller, sandbox, script: str, **fields) -> api.ProcessInfo:
    request = api.StartProcessRequest(sandbox=sandbox, process=api.ProcessConfig(argv=["sh", "-c", script]), **fields)
    return (await caller.stub.StartProcess(request, metadata=caller.metadata, timeout=30)).process


async def listed(caller, sandbox, pid: int) -> api.ProcessInfo:
    reply = await caller.stub.ListProcesses(api.ListProcessesRequest(sandbox=sandbox), metadata=caller.metadata)
    return {p.pid: p for p in reply.processes}[pid]


async def follow(caller, sandbox, pid: int, tail_bytes: int = 0, until: int | None = None):
    """(stdout, stderr, exited or None): to the end, or until `until` bytes came (then the call is cancelled)."""
    call = caller.stub.ConnectProcess(
        api.ConnectProcessRequest(sandbox=sandbox, pid=pid, tail_bytes=tail_bytes), metadata=caller.metadata, timeout=60
    )
    stdout = stderr = b""
    async for response in call:
        event = response.event
        stdout, stderr = stdout + event.stdout, stderr + event.stderr
        if event.HasField("exited"):
            return stdout, stderr, event.exited
        if until is not None and len(stdout) + len(stderr) >= until:
            call.cancel()
            return stdout, stderr, None
    raise AssertionError("the stream ended without an exit")


async def wait_until(predicate, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_background_process_answers_at_once_and_a_late_follower_gets_its_tail(caller, sandbox):
    process = await start(caller, sandbox, "echo one; echo err >&2; echo two; exec sleep 60", tag="server")
    assert process.pid > 0 and process.running and process.tag == "server"
    await wait_until(lambda: _output_bytes_at_least(caller, sandbox, process.pid, 12))
    stdout, stderr, exited = await follow(caller, sandbox, process.pid, tail_bytes=MIB, until=12)
    assert stdout == b"one\ntwo\n" and stderr == b"err\n" and exited is None
    # The follower went away: the process did not.
    assert (await listed(caller, sandbox, process.pid)).running
    signalled = await caller.stub.SignalProcess(
        api.SignalProcessRequest(sandbox=sandbox, pid=process.pid, signal=15), metadata=caller.metadata
    )
    assert signalled.process.pid == process.pid
    _, _, exited = await follow(caller, sandbox, process.pid)
    assert exited.signal == 15
    ended = await listed(caller, sandbox, process.pid)
    assert not ended.running and ended.exited.signal == 15


async def _output_bytes_at_least(caller, sandbox, pid: int, count: int) -> bool:
    return (await listed(caller, sandbox, pid)).output_bytes >= count


async def test_stdin_reaches_a_process_started_with_it_and_closing_it_ends_cat(caller, sandbox):
    process = await start(caller, sandbox, "exec cat", stdin=True)
    # From the start of its buffer: the follower may attach after the first input was echoed.
    follower = asyncio.create_task(follow(caller, sandbox, process.pid, tail_bytes=MIB))
    for chunk in (b"hello ", b"world\n"):
        await caller.stub.SendProcessInput(
            api.SendProcessInputRequest(sandbox=sandbox, pid=process.pid, stdin=chunk), metadata=caller.metadata
        )
    await caller.stub.SendProcessInput(
        api.SendProcessInputRequest(sandbox=sandbox, pid=process.pid, close_stdin=True), metadata=caller.metadata
    )
    stdout, _, exited = await follower
    assert stdout == b"hello world\n" and exited.exit_code == 0


async def test_the_buffer_keeps_the_newest_mebibyte(caller, sandbox):
    # 3 MiB of numbered lines of 16 bytes each.
    process = await start(caller, sandbox, "seq -f '%015g' 1 196608")
    stdout, _, exited = await follow(caller, sandbox, process.pid, tail_bytes=MIB)
    assert exited.exit_code == 0
    ended = await listed(caller, sandbox, process.pid)
    assert ended.output_bytes == 3 * MIB
    # A follower that joins after the end gets at most the newest MiB, ending with the last line.
    stdout, _, _ = await follow(caller, sandbox, process.pid, tail_bytes=MIB)
    assert len(stdout) <= MIB and stdout.endswith(b"000000000196608\n") and len(stdout) > MIB - 64 * 1024


async def test_it_runs_on_through_a_relay_restart(installation, caller, sandbox):
    process = await start(caller, sandbox, "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done")
    await installation.stop("relay")
    await installation.start("relay")
    info = await listed(caller, sandbox, process.pid)
    assert info.running
    await wait_until(lambda: _output_bytes_at_least(caller, sandbox, process.pid, info.output_bytes + 10))
    await caller.stub.SignalProcess(
        api.SignalProcessRequest(sandbox=sandbox, pid=process.pid, signal=9), metadata=caller.metadata
    )


@pytest.mark.parametrize(
    ("method", "request_fields", "code", "reason"),
    [
        ("ConnectProcess", {"pid": 999999}, grpc.StatusCode.NOT_FOUND, "PROCESS_NOT_FOUND"),
        ("SignalProcess", {"pid": 999999, "signal": 9}, grpc.StatusCode.NOT_FOUND, "PROCESS_NOT_FOUND"),
        ("SignalProcess", {"pid": 1, "signal": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("SignalProcess", {"pid": 0, "signal": 9}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("ConnectProcess", {"pid": 1, "tail_bytes": MIB + 1}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("SendProcessInput", {"pid": 999999, "stdin": b"x"}, grpc.StatusCode.NOT_FOUND, "PROCESS_NOT_FOUND"),
    ],
)
async def test_bad_requests_say_what_is_wrong(caller, sandbox, method, request_fields, code, reason):
    request = getattr(api, f"{method}Request")(sandbox=sandbox, **request_fields)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        call = getattr(caller.stub, method)(request, metadata=caller.metadata, timeout=30)
        if method == "ConnectProcess":
            async for _ in call:
                pass
        else:
            await call
    assert refused.value.code() == code and error_info(refused.value).reason == reason, refused.value.details()


async def test_input_to_a_process_without_stdin_is_refused(caller, sandbox):
    process = await start(caller, sandbox, "exec sleep 30")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await caller.stub.SendProcessInput(
            api.SendProcessInputRequest(sandbox=sandbox, pid=process.pid, stdin=b"x"), metadata=caller.metadata
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "PROCESS_STDIN_CLOSED"
    await caller.stub.SignalProcess(
        api.SignalProcessRequest(sandbox=sandbox, pid=process.pid, signal=9), metadata=caller.metadata
    )
