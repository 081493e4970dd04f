"""The Python SDK against the real stack: async and sync, processes, files, snapshots, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest

from microvm_sandbox import (
    AsyncSandbox,
    Client,
    CommandNotFound,
    Exited,
    InvalidArgumentError,
    NotFoundError,
    Sandbox,
    SandboxNotFound,
    SnapshotNotFound,
    Stdout,
)
from microvm_sandbox.aio import AsyncClient

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def client(stack):
    client = Client(stack.gateway_address, stack.admin_key)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shared(stack, client):
    """One sandbox for the tests that only run things in it, made with an environment and labels."""
    sandbox = Sandbox.create(
        envs={"GREETING": "hello from env", "MODE": "sdk"},
        labels={"suite": "sdk", "run": uuid.uuid4().hex[:8]},
        timeout=900,
        client=client,
    )
    yield sandbox
    sandbox.kill()


def gone_from_guest(sandbox: Sandbox, marker: str, seconds: float = 30) -> bool:
    """True once no process in the guest has `marker` in its command line (pgrep -f), polling until `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sandbox.exec(["pgrep", "-f", marker]).exit_code == 1:
            return True
        time.sleep(0.3)
    return False


def test_async_sandbox_in_one_line(stack):
    async def scenario():
        client = AsyncClient(stack.gateway_address, stack.admin_key)
        async with AsyncSandbox.create(template="default", timeout=300, client=client) as sb:
            result = await sb.exec(["python3", "-c", "print(6*7)"])
            assert (result.stdout, result.exit_code, result.ok) == (b"42\n", 0, True)
            events = [e async for e in sb.exec_stream("echo one; sleep 0.2; echo two")]
            assert [e.data for e in events if isinstance(e, Stdout)] == [b"one\n", b"two\n"]
            assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
            assert (await sb.run_script("python", "import sys; print(sys.version_info[0])")).text == "3\n"
            await sb.write("/root/data/notes.txt", "hello sdk")
            assert await sb.read("/root/data/notes.txt") == b"hello sdk"
            assert [e.path for e in await sb.ls("/root/data")] == ["/root/data/notes.txt"]
            with pytest.raises(NotFoundError) as failure:
                await sb.read("/missing")
            assert failure.value.reason == "NOT_FOUND"
            snapshot = await sb.snapshot(labels={"step": "1"})
            await sb.write("/root/data/notes.txt", "changed")
            restored = await AsyncSandbox.restore(snapshot, client=client)
            try:
                assert await restored.read("/root/data/notes.txt") == b"hello sdk"  # back in time
            finally:
                await restored.kill()
            await snapshot.delete()
            name = sb.name
        with pytest.raises(SandboxNotFound):
            await AsyncSandbox.connect(name, client=client)
        await client.close()

    asyncio.run(scenario())


def test_sync_sandbox_mirrors_the_async_one(stack, tmp_path):
    with Sandbox.create(address=stack.gateway_address, api_key=stack.admin_key) as sb:
        assert sb.exec(["echo", "sync"]).stdout == b"sync\n"
        assert [e.data for e in sb.exec_stream(["echo", "streamed"]) if isinstance(e, Stdout)] == [b"streamed\n"]
        (tmp_path / "up.bin").write_bytes(b"\x00\x01" * 1000)
        sb.upload(tmp_path / "up.bin", "/root/up.bin")
        sb.download("/root/up.bin", tmp_path / "down.bin")
        assert (tmp_path / "down.bin").read_bytes() == b"\x00\x01" * 1000
        sb.pause()
        sb.resume()
        clones = sb.fork(2)
        try:
            assert len({c.exec(["hostname"]).stdout for c in clones}) == 2
        finally:
            for clone in clones:
                clone.kill()
        with pytest.raises(InvalidArgumentError):
            sb.run_script("cobol", "DISPLAY 'HI'.")


def test_every_command_of_a_sandbox_gets_its_env_and_get_info_describes_it(shared):
    assert shared.exec("echo $GREETING").text == "hello from env\n"
    assert shared.exec(["sh", "-c", "echo $MODE"], env={"MODE": "own"}).text == "own\n"  # the exec's own wins
    info = shared.get_info()
    assert (info.id, info.template, info.state) == (shared.id, "default", "RUNNING")
    assert info.env == {"GREETING": "hello from env", "MODE": "sdk"}
    assert info.labels["suite"] == "sdk"
    assert (info.vcpus, info.memory_mib) == (1, 256) and info.node
    assert info.started_at < datetime.now(UTC) < info.expires_at


def test_set_timeout_moves_the_expiry(shared):
    shared.set_timeout(3600)
    later = shared.get_info().expires_at
    assert (later - datetime.now(UTC)).total_seconds() > 1800
    shared.set_timeout(600)
    assert shared.get_info().expires_at < later


def test_list_filters_by_state_and_labels_and_connect_resumes_a_paused_sandbox(shared, client):
    mine = {"suite": "sdk", "run": shared.get_info().labels["run"]}
    assert [s.id for s in Sandbox.list(labels=mine, client=client)] == [shared.id]
    assert [s.id for s in Sandbox.list(state="running", labels=mine, client=client)] == [shared.id]
    assert Sandbox.list(state="paused", labels=mine, client=client) == []
    assert shared.id not in [s.id for s in Sandbox.list(labels={"suite": "nobody"}, client=client)]
    with pytest.raises(InvalidArgumentError):
        Sandbox.list(state="sleeping", client=client)
    shared.pause()
    assert [s.id for s in Sandbox.list(state="paused", labels=mine, client=client)] == [shared.id]
    again = Sandbox.connect(shared.id, client=client)
    assert again.state == "RUNNING" and again.exec("echo back").text == "back\n"
    assert shared.is_running()


def test_run_script_runs_each_language_with_its_own_interpreter(shared):
    assert shared.run_script("bash", "echo ${BASH_VERSION:+bash}").text == "bash\n"
    assert shared.run_script("sh", "echo ${BASH_VERSION:-not bash}").text == "not bash\n"
    assert shared.run_script("python", "print(6*7)").text == "42\n"
    assert shared.run_script("py", "import sys; sys.exit(3)").exit_code == 3
    chunks: list[bytes] = []
    shared.run_script("bash", "echo a; echo b >&2", on_stdout=chunks.append, on_stderr=chunks.append)
    assert sorted(chunks) == [b"a\n", b"b\n"]


def test_run_script_says_which_interpreter_is_missing(shared):
    with pytest.raises(CommandNotFound) as failure:
        shared.run_script("javascript", "console.log(1)")  # the default template has no node
    assert failure.value.metadata == {"language": "javascript", "interpreter": "node"}
    assert "javascript" in str(failure.value) and "node" in str(failure.value)
    assert isinstance(failure.value, NotFoundError)


def test_errors_name_what_is_missing(shared, client):
    with pytest.raises(SandboxNotFound) as missing:
        Sandbox.connect("no-such-sandbox", client=client)
    assert missing.value.sandbox_id == "no-such-sandbox" and missing.value.code == "NOT_FOUND"
    with pytest.raises(CommandNotFound):
        shared.exec(["no-such-program"])
    with pytest.raises(SnapshotNotFound):
        client.get_snapshot("snap-000000000000")
    with pytest.raises(InvalidArgumentError):
        shared.set_timeout(10**9)


def test_stopping_an_exec_stream_early_ends_the_guest_process(shared):
    marker = f"sdk-stream-{uuid.uuid4().hex[:10]}"
    program = f"import time\nprint('ready', flush=True)\ntime.sleep(1000)  # {marker}"
    for event in shared.exec_stream(["python3", "-c", program]):
        if isinstance(event, Stdout):
            break  # the stream is dropped here: the sync SDK cancels the call
    assert gone_from_guest(shared, marker)


def test_stopping_an_async_exec_stream_early_ends_the_guest_process(stack, shared):
    marker = f"sdk-astream-{uuid.uuid4().hex[:10]}"
    program = f"import time\nprint('ready', flush=True)\ntime.sleep(1000)  # {marker}"

    async def scenario():
        client = AsyncClient(stack.gateway_address, stack.admin_key)
        try:
            sandbox = await AsyncSandbox.connect(shared.id, client=client)
            async for event in sandbox.exec_stream(["python3", "-c", program]):
                if isinstance(event, Stdout):
                    break
            # Still connected: only the stream ended, not the client.
            return (await sandbox.exec(["echo", "still here"])).text
        finally:
            await client.close()

    assert asyncio.run(scenario()) == "still here\n"
    assert gone_from_guest(shared, marker)


def test_snapshots_are_listed_and_deleted_and_fork_keeps_none_unless_asked(shared, client):
    snapshot = shared.snapshot(labels={"step": "one"})
    assert snapshot.id in [s.id for s in shared.list_snapshots()]
    assert client.get_snapshot(snapshot.id).labels == {"step": "one"}
    snapshot.delete()
    assert snapshot.id not in [s.id for s in shared.list_snapshots()]
    with pytest.raises(SnapshotNotFound):
        snapshot.delete()

    before = {s.name for s in client.list_snapshots()}
    (clone,) = shared.fork(1)
    try:
        assert clone.exec("echo $GREETING").text == "hello from env\n"  # a clone keeps the environment
        assert {s.name for s in client.list_snapshots()} == before  # nothing left behind
    finally:
        clone.kill()
    (kept,) = shared.fork(1, keep_snapshot=True)
    try:
        assert kept.source_snapshot and f"snapshots/{kept.source_snapshot}" in {s.name for s in client.list_snapshots()}
    finally:
        kept.kill()
        shared.delete_snapshot(kept.source_snapshot)


def test_background_commands_and_a_terminal_in_a_real_guest(shared):
    commands = shared.commands
    seen: list[bytes] = []
    ticker = commands.run(
        "for i in 1 2 3; do echo tick$i; sleep 0.2; done; read line; echo got:$line",
        background=True,
        stdin=True,
        tag="ticker",
        on_stdout=seen.append,
    )
    assert {p.pid: p.tag for p in commands.list()}[ticker.pid] == "ticker"
    ticker.send_stdin("hi\n")
    result = ticker.wait(timeout=60)
    assert result.stdout == b"tick1\ntick2\ntick3\ngot:hi\n" and result.ok and b"".join(seen) == result.stdout
    sleeper = commands.run("exec sleep 301", background=True)
    again = commands.connect(sleeper.pid)
    assert commands.kill(sleeper.pid) is True
    assert again.wait(timeout=30).signal == 9 and sleeper.wait(timeout=30).signal == 9
    assert gone_from_guest(shared, "sleep 301")
    bounded = shared.exec("head -c 3000000 /dev/zero", max_output_bytes=1000)
    assert len(bounded.stdout) == 1000 and bounded.truncated and bounded.output_bytes == 3_000_000
    terminal = shared.pty.create(cols=120, rows=40)  # an interactive bash
    terminal.send_input("stty size; exit 7\n")
    ended = terminal.wait(timeout=60)
    assert b"40 120" in ended.stdout and ended.exit_code == 7
