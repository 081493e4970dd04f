"""E2B `commands` and `pty` through envd (services/gateway/e2b/envd.py): the unmodified E2B SDK against a real
in-process installation (fake VMM: the real agent runs each sandbox as a host process), envd mounted on its own."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from e2b import CommandExitException, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.e2b_envd import SANDBOX_ENV, e2b_sandbox, envd_app
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"envd-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def sandbox(caller):
    request = api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(env=SANDBOX_ENV))
    created = await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)
    sandbox_id = created.sandbox.name.split("/", 1)[1]
    async with envd_app(caller, sandbox_id) as url:
        yield e2b_sandbox(url, sandbox_id)


async def wait_until(predicate, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_run_answers_output_exit_code_env_and_cwd(sandbox):
    # The fake VMM's guest is a host process whose / is a directory of the host: `pwd` ends in the guest's path.
    script = 'echo "$GREETING" from $(pwd); echo oops >&2'
    result = await sandbox.commands.run(script, envs={"GREETING": "hi"}, cwd="/tmp")
    assert result.stdout.startswith("hi from /") and result.stdout.endswith("/tmp\n")
    assert (result.stderr, result.exit_code) == ("oops\n", 0)
    assert (await sandbox.commands.run("echo $HOME")).stdout == "/tmp\n"  # the sandbox's env (SANDBOX_ENV) holds
    seen = []
    await sandbox.commands.run("printf 'a\\nb\\n'", on_stdout=seen.append)
    assert "".join(seen) == "a\nb\n"


async def test_a_failing_command_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as raised:
        await sandbox.commands.run("echo partial; exit 3")
    assert raised.value.exit_code == 3 and raised.value.stdout == "partial\n"
    assert raised.value.error == "exit status 3"


async def test_user_root_runs_as_root_and_user_is_the_templates_default(sandbox):
    assert (await sandbox.commands.run("id -u", user="root")).stdout == "0\n"
    assert (await sandbox.commands.run("id -u", user="user")).exit_code == 0


async def test_a_timeout_ends_the_command_and_kills_it(sandbox):
    with pytest.raises(TimeoutException):
        await sandbox.commands.run("sleep 30; echo timeout-marker", timeout=1)

    async def gone():
        return not [p for p in await sandbox.commands.list() if "timeout-marker" in " ".join(p.args)]

    await wait_until(gone)


async def test_background_command_is_listed_connected_to_and_killed(sandbox):
    handle = await sandbox.commands.run("echo started; exec sleep 60", background=True)
    listed = {p.pid: p for p in await sandbox.commands.list()}
    assert handle.pid in listed and listed[handle.pid].cmd == "/bin/bash"
    assert listed[handle.pid].args[-1] == "echo started; exec sleep 60"
    follower = await sandbox.commands.connect(handle.pid)
    assert await sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as raised:
        await follower.wait()
    assert raised.value.exit_code == -1 and raised.value.error == "signal: killed"
    with pytest.raises(CommandExitException):
        await handle.wait()
    assert await sandbox.commands.kill(handle.pid) is False  # gone: not_found, which the SDK answers False for


async def test_stdin_is_sent_and_closed(sandbox):
    handle = await sandbox.commands.run("cat; echo done", background=True, stdin=True)
    await sandbox.commands.send_stdin(handle.pid, "line one\n")
    await sandbox.commands.send_stdin(handle.pid, b"line two\n")
    await sandbox.commands.close_stdin(handle.pid)
    result = await handle.wait()
    assert result.stdout == "line one\nline two\ndone\n"


async def test_ordered_input_streams_over_one_call(sandbox):
    handle = await sandbox.commands.run("cat", background=True, stdin=True)
    async with sandbox.commands.stream_input(handle.pid) as stream:  # StreamInput: a client stream, read live
        for piece in ("a", "b", "c"):
            await stream.send(piece)
    await sandbox.commands.close_stdin(handle.pid)
    assert (await handle.wait()).stdout == "abc"


async def test_connect_to_an_unknown_pid_is_not_found(sandbox):
    from e2b.exceptions import NotFoundException

    with pytest.raises(NotFoundException):
        await sandbox.commands.connect(4_000_000)
    with pytest.raises(NotFoundException):
        await sandbox.commands.send_stdin(4_000_000, "x")


async def test_a_pty_takes_input_resizes_and_is_killed(sandbox):
    output = bytearray()
    terminal = await sandbox.pty.create(PtySize(rows=24, cols=80), on_data=output.extend, timeout=60)
    assert terminal.pid in {p.pid for p in await sandbox.commands.list()}
    await sandbox.pty.resize(terminal.pid, PtySize(rows=40, cols=100))
    await sandbox.pty.send_stdin(terminal.pid, b"stty size; echo marker-$((6*7))\n")

    async def answered():
        return b"marker-42" in output and b"40 100" in output

    await wait_until(answered)
    assert await sandbox.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException):
        await terminal.wait()
    assert terminal.pid not in {p.pid for p in await sandbox.commands.list()}
