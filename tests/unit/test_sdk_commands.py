"""The SDK's `sandbox.commands` (E2B-like processes: foreground with bounded output, background handles that are
followed, fed, signalled and reconnected) and `sandbox.pty` (terminals), async and sync, against an in-process
installation (fake VMM: the real guest agent runs as a host process)."""

from __future__ import annotations

import asyncio

import pytest

from microvm_sandbox import (
    AsyncSandbox,
    CommandNotFound,
    FailedPreconditionError,
    InvalidArgumentError,
    ProcessNotFound,
    Sandbox,
    Stdout,
)
from microvm_sandbox.aio import AsyncClient
from microvm_sandbox.commands import AsyncCommandHandle, AsyncCommands
from microvm_sandbox.commands_sync import CommandHandle, Commands
from microvm_sandbox.models import Exited, Stderr
from microvm_sandbox.output import OutputCollector
from microvm_sandbox.terminal import AsyncPty, AsyncPtyHandle, Pty, PtyHandle
from tests.inprocess import tenant_caller
from tests.unit.test_sdk_surface import parameters, public

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
ONE_MIB_OF_LINES = "seq -f '%015g' 1 65536"  # 65536 lines of 16 bytes


@pytest.fixture(scope="module")
async def installation(installation):
    caller = await tenant_caller(installation, f"sdkcmd-{installation.node}")
    installation.gateway = await installation.address("gateway")
    installation.key = caller.key
    return installation


@pytest.fixture(scope="module")
async def sandbox(installation):
    client = AsyncClient(installation.gateway, installation.key)
    sandbox = await AsyncSandbox.create(client=client)
    yield sandbox
    await sandbox.kill()
    await client.close()


# --- pure logic ---------------------------------------------------------------------------------------------
def test_the_collector_keeps_at_most_its_bound_across_both_streams_and_says_it_dropped():
    output = OutputCollector(max_output_bytes=10)
    for event in (Stdout(b"123456"), Stderr(b"abcdef"), Stdout(b"zz")):
        output.add(event)
    result = output.result(Exited(0, None, False))
    assert (result.stdout, result.stderr, result.truncated, result.output_bytes) == (b"123456", b"abcd", True, 14)
    everything = OutputCollector(max_output_bytes=0)
    everything.add(Stdout(b"x" * 100))
    result = everything.result(Exited(None, 9, False), output_bytes=100)
    assert not result.truncated and result.signal == 9 and result.output_bytes == 100
    # What the process wrote before a follower came (output_bytes beyond what arrived) is missing too.
    assert everything.result(Exited(0, None, False), output_bytes=150).truncated


# --- foreground ---------------------------------------------------------------------------------------------
async def test_foreground_run_returns_the_result_and_bounds_what_it_collects(sandbox):
    result = await sandbox.commands.run("echo out; echo err >&2; exit 3", envs={"X": "1"})
    assert (result.stdout, result.stderr, result.exit_code, result.truncated) == (b"out\n", b"err\n", 3, False)
    bounded = await sandbox.commands.run(ONE_MIB_OF_LINES, max_output_bytes=1000)
    assert len(bounded.stdout) == 1000 and bounded.truncated and bounded.output_bytes == MIB and bounded.ok
    whole = await sandbox.exec(["sh", "-c", ONE_MIB_OF_LINES])
    assert len(whole.stdout) == MIB and not whole.truncated and whole.output_bytes == MIB
    seen = []
    fed = await sandbox.commands.run(["cat"], stdin=b"fed\n", on_stdout=seen.append)
    assert fed.stdout == b"fed\n" and b"".join(seen) == b"fed\n"
    with pytest.raises(InvalidArgumentError):
        await sandbox.commands.run("cat", stdin=True)
    with pytest.raises(CommandNotFound):
        await sandbox.commands.run(["no-such-program-here"])


# --- background ---------------------------------------------------------------------------------------------
async def test_a_background_process_is_listed_fed_and_waited_for_with_callbacks_as_output_arrives(sandbox):
    chunks: list[bytes] = []
    handle = await sandbox.commands.run(
        ["sh", "-c", "echo ready; exec cat"], background=True, stdin=True, tag="echo", on_stdout=chunks.append
    )
    assert handle.pid > 0 and handle.tag == "echo"
    for _ in range(500):  # the callback runs as output arrives, before anyone waits
        if chunks:
            break
        await asyncio.sleep(0.02)
    assert b"".join(chunks) == b"ready\n"
    listed = {p.pid: p for p in await sandbox.commands.list()}[handle.pid]
    assert listed.running and listed.tag == "echo" and listed.exit_code is None
    await handle.send_stdin("hello\n")
    await sandbox.commands.send_stdin(handle.pid, b"world\n")
    await handle.close_stdin()
    result = await handle.wait(timeout=30)
    assert result.stdout == b"ready\nhello\nworld\n" and result.exit_code == 0 and not result.truncated
    assert b"".join(chunks) == result.stdout and handle.exit_code == 0
    ended = await sandbox.commands.get(handle.pid)
    assert not ended.running and ended.exit_code == 0 and ended.output_bytes == len(result.stdout)


async def test_kill_ends_it_and_says_whether_it_ran_and_a_missing_pid_is_process_not_found(sandbox):
    handle = await sandbox.commands.run("exec sleep 60", background=True)
    assert await handle.kill() is True
    result = await handle.wait(timeout=30)
    assert result.signal == 9 and result.exit_code is None
    assert await sandbox.commands.kill(handle.pid) is False  # already ended
    with pytest.raises(ProcessNotFound) as missing:
        await sandbox.commands.kill(999_999)
    assert missing.value.reason == "PROCESS_NOT_FOUND" and missing.value.code == "NOT_FOUND"
    with pytest.raises(ProcessNotFound):
        await sandbox.commands.connect(999_999)
    with pytest.raises(ProcessNotFound):
        await sandbox.commands.send_stdin(999_999, b"x")


async def test_a_process_runs_on_after_its_follower_disconnects_and_connect_replays_its_tail(sandbox):
    handle = await sandbox.commands.run(
        "i=0; while [ $i -lt 3 ]; do i=$((i+1)); echo line$i; done; exec sleep 60", background=True, tag="loop"
    )
    events = aiter(handle)
    first = await asyncio.wait_for(anext(events), 30)
    assert isinstance(first, Stdout) and first.data.startswith(b"line1")
    await handle.disconnect()
    with pytest.raises(FailedPreconditionError):
        await handle.wait()
    assert (await sandbox.commands.get(handle.pid)).running
    again = await sandbox.commands.connect(handle.pid, tail_bytes=MIB)
    assert again.tag == "loop"
    for _ in range(500):
        if again.stdout == "line1\nline2\nline3\n":
            break
        await asyncio.sleep(0.02)
    assert again.stdout == "line1\nline2\nline3\n"
    info = await again.signal(15)
    assert info.pid == handle.pid
    result = await again.wait(timeout=30)
    assert result.signal == 15 and result.stdout == b"line1\nline2\nline3\n" and not result.truncated
    late = await sandbox.commands.connect(handle.pid)  # an ended process: no tail asked, nothing replayed
    events = [event async for event in late]
    assert len(events) == 1 and isinstance(events[0], Exited) and events[0].signal == 15
    assert (await late.wait()).truncated  # it wrote output this follower did not get


async def test_a_callback_that_fails_fails_the_wait(sandbox):
    def explode(data: bytes) -> None:
        raise ValueError("callback broke")

    handle = await sandbox.commands.run("echo x", background=True, on_stdout=explode)
    with pytest.raises(ValueError, match="callback broke"):
        await handle.wait(timeout=30)


# --- terminals ----------------------------------------------------------------------------------------------
async def test_a_terminal_takes_input_and_resizes_and_its_output_arrives_merged(sandbox):
    printed: list[bytes] = []
    term = await sandbox.pty.create(
        cols=100,
        rows=30,
        cmd=["sh", "-c", "tty; stty size; read line; stty size; echo got:$line >&2"],
        on_data=printed.append,
    )
    assert term.pid > 0
    for _ in range(500):
        if b"30 100" in b"".join(printed):
            break
        await asyncio.sleep(0.02)
    await term.resize(132, 43)
    await term.send_input("hello\n")
    result = await term.wait(timeout=30)
    text = result.stdout.decode()
    assert "/dev/pts/" in text and "30 100" in text and "43 132" in text and "got:hello" in text
    assert result.exit_code == 0 and result.stderr == b"" and b"".join(printed) == result.stdout


async def test_killing_a_terminal_ends_its_process(sandbox):
    term = await sandbox.pty.create(cmd="exec sleep 60")
    assert await term.kill() is True
    assert (await term.wait(timeout=30)).signal == 9
    assert await term.kill() is False
    with pytest.raises(CommandNotFound):
        await sandbox.pty.create(cmd=["no-such-shell"])


# --- the synchronous SDK ------------------------------------------------------------------------------------
async def test_the_sync_sdk_has_the_same_commands_and_terminals(installation, sandbox):
    def use() -> None:
        from microvm_sandbox import Client

        client = Client(installation.gateway, installation.key)
        sync_sandbox = Sandbox.connect(sandbox.id, client=client)
        commands = sync_sandbox.commands
        seen: list[bytes] = []
        assert commands.run("echo hi", on_stdout=seen.append).stdout == b"hi\n" and seen == [b"hi\n"]
        assert commands.run(ONE_MIB_OF_LINES, max_output_bytes=10).truncated
        assert sync_sandbox.exec(["echo", "x"], max_output_bytes=1).stdout == b"x"

        called: list[bytes] = []
        handle = commands.run("exec cat", background=True, stdin=True, tag="sync", on_stdout=called.append)
        assert handle.pid in [p.pid for p in commands.list()]
        handle.send_stdin(b"abc")
        handle.close_stdin()
        result = handle.wait(timeout=30)
        assert result.stdout == b"abc" and b"".join(called) == b"abc"  # the callback ran in this thread, in wait()

        sleeper = commands.run("exec sleep 60", background=True)
        follower = commands.connect(sleeper.pid)
        assert commands.kill(sleeper.pid) is True
        assert [type(e) for e in follower] == [Exited] and follower.wait().signal == 9

        printed: list[bytes] = []
        term = sync_sandbox.pty.create(cols=90, rows=20, cmd=["sh", "-c", "stty size"], on_data=printed.append)
        assert b"20 90" in term.wait(timeout=30).stdout and b"20 90" in b"".join(printed)
        client.close()

    await asyncio.to_thread(use)


# --- surface ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "async_cls, sync_cls",
    [(AsyncCommands, Commands), (AsyncCommandHandle, CommandHandle), (AsyncPty, Pty), (AsyncPtyHandle, PtyHandle)],
)
def test_the_sync_classes_mirror_the_async_ones_and_everything_is_documented(async_cls, sync_cls):
    asynchronous, synchronous = public(async_cls), public(sync_cls)
    one_sided = {"aio", "sandbox_name", "client", "finished"}
    assert set(asynchronous) - one_sided <= set(synchronous), async_cls
    for name in set(asynchronous) & set(synchronous) - one_sided:
        assert parameters(asynchronous[name]) == parameters(synchronous[name]), name
    for cls in (async_cls, sync_cls):
        assert cls.__doc__
        for name, member in public(cls).items():
            function = member.fget if isinstance(member, property) else member
            assert not callable(function) or function.__doc__, f"{cls.__name__}.{name}"
