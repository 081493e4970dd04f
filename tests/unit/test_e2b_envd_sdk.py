"""The unmodified E2B SDK end to end through the gateway's E2B doors (control plane and the in-sandbox traffic door,
which hands port 49983 to envd.py): `Sandbox.create()` and then commands, files and PTYs as agent code uses them,
async and sync (the sync SDK in a thread: it blocks, and the installation serves from this loop). A real in-process
installation (fake VMM: the real agent runs each sandbox as a host process)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from tests.e2b_envd import SANDBOX_ENV

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def sandbox(doors):
    made = await AsyncSandbox.create(timeout=600, envs={"FROM_CREATE": "yes", **SANDBOX_ENV})
    yield made
    await made.kill()


async def eventually(predicate, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_commands_run_with_env_cwd_user_and_exit_codes(sandbox):
    result = await sandbox.commands.run('echo "$FROM_CREATE $OWN" $(id -u)', envs={"OWN": "mine"}, user="root")
    assert (result.stdout, result.exit_code) == ("yes mine 0\n", 0)
    assert (await sandbox.commands.run("pwd", cwd="/tmp")).stdout.endswith("/tmp\n")
    with pytest.raises(CommandExitException) as raised:
        await sandbox.commands.run("echo nope >&2; exit 7")
    assert (raised.value.exit_code, raised.value.stderr) == (7, "nope\n")


async def test_background_connect_list_send_stdin_and_kill(sandbox):
    reader = await sandbox.commands.run("read line; echo got $line", background=True, stdin=True)
    follower = await sandbox.commands.connect(reader.pid)
    await sandbox.commands.send_stdin(reader.pid, "hello\n")
    assert (await follower.wait()).stdout == "got hello\n"
    sleeper = await sandbox.commands.run("sleep 60", background=True)
    assert sleeper.pid in {p.pid for p in await sandbox.commands.list()}
    assert await sandbox.commands.kill(sleeper.pid)
    with pytest.raises(CommandExitException):
        await sleeper.wait()
    assert sleeper.pid not in {p.pid for p in await sandbox.commands.list()}


async def test_files_round_trip_list_watch_and_remove(sandbox):
    base = f"/tmp/e2b-sdk-{uuid.uuid4().hex[:6]}"
    await sandbox.files.write(f"{base}/a/b.txt", "text")
    await sandbox.files.write(f"{base}/bytes.bin", b"\x00\x01")
    assert await sandbox.files.read(f"{base}/a/b.txt") == "text"
    assert await sandbox.files.read(f"{base}/bytes.bin", format="bytes") == b"\x00\x01"
    assert {e.path for e in await sandbox.files.list(base, depth=2)} == {
        f"{base}/a",
        f"{base}/a/b.txt",
        f"{base}/bytes.bin",
    }
    events = []
    watch = await sandbox.files.watch_dir(base, on_event=events.append)
    await sandbox.files.rename(f"{base}/bytes.bin", f"{base}/renamed.bin")
    await sandbox.files.remove(f"{base}/a")

    async def seen():
        return any(e.type == FilesystemEventType.REMOVE and e.name == "a" for e in events)

    await eventually(seen)
    await watch.stop()
    assert not await sandbox.files.exists(f"{base}/a") and await sandbox.files.exists(f"{base}/renamed.bin")


async def test_a_pty_through_the_door(sandbox):
    output = bytearray()
    terminal = await sandbox.pty.create(PtySize(rows=20, cols=60), on_data=output.extend)
    await sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=90))
    await sandbox.pty.send_stdin(terminal.pid, b"stty size; echo pty-$((2+3))\n")

    async def answered():
        return b"30 90" in output and b"pty-5" in output

    await eventually(answered)
    assert await sandbox.pty.kill(terminal.pid)
    with pytest.raises(CommandExitException):
        await terminal.wait()


async def test_the_sync_sdk_works_too(doors):
    def agent_code() -> tuple[str, str]:
        made = Sandbox.create(timeout=300, envs=SANDBOX_ENV)
        try:
            output = made.commands.run("echo sync").stdout
            made.files.write("/tmp/sync.txt", "written")
            return output, made.files.read("/tmp/sync.txt")
        finally:
            made.kill()

    assert await asyncio.to_thread(agent_code) == ("sync\n", "written")
