"""`mvm exec --background`, `mvm ps`, `mvm attach` and `mvm kill`: their parsing and output, then the commands
themselves against an in-process installation (fake VMM: the real guest agent runs as a host process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest
from google.protobuf import timestamp_pb2

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from mvm_cli.main import parse
from mvm_cli.processes import process_table, status_text
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


# --- parsing and output -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, tag, command",
    [
        (["exec", "sbx-1", "--background", "--tag", "web", "--", "python3", "-m", "http.server"], "web", None),
        (["exec", "-d", "sbx-1", "python3", "-m", "http.server"], "", None),
        (["exec", "sbx-1", "--tag=web", "-d", "python3", "-m", "http.server"], "web", None),
    ],
)
def test_exec_takes_background_and_tag_anywhere_before_the_command(argv, tag, command):
    args = parse(argv)
    assert args.background and args.id == "sbx-1" and args.tag == tag
    assert args.command == ["python3", "-m", "http.server"]


def test_plain_exec_is_not_background_and_kill_attach_ps_parse():
    assert not parse(["exec", "sbx-1", "--", "true"]).background
    assert parse(["kill", "sbx-1", "42"]).signal == 9
    assert parse(["kill", "sbx-1", "42", "-s", "TERM"]).signal == 15
    assert parse(["kill", "sbx-1", "42", "--signal", "SIGINT"]).signal == 2
    assert parse(["kill", "sbx-1", "42", "--signal", "2"]).signal == 2
    with pytest.raises(SystemExit):
        parse(["kill", "sbx-1", "42", "--signal", "NOPE"])
    attach = parse(["attach", "sbx-1", "42", "--tail", "4096"])
    assert (attach.id, attach.pid, attach.tail) == ("sbx-1", 42, 4096)
    ps = parse(["ps", "sbx-1", "--json"])
    assert ps.json and not ps.quiet


def test_the_process_table_says_how_each_one_ended():
    started = timestamp_pb2.Timestamp(seconds=1000)
    running = api.ProcessInfo(pid=7, argv=["sleep", "60"], tag="web", running=True, start_time=started, output_bytes=5)
    killed = api.ProcessInfo(pid=8, argv=["sh", "-c", "x"], start_time=started, output_bytes=3 << 20)
    killed.exited.signal = 15
    done = api.ProcessInfo(pid=9, argv=["true"], start_time=started)
    done.exited.exit_code = 0
    timed = api.ProcessInfo(pid=10, argv=["sleep", "9"], start_time=started)
    timed.exited.signal, timed.exited.timed_out = 9, True
    assert [status_text(p) for p in (running, killed, done, timed)] == [
        "running",
        "killed (SIGTERM)",
        "exited 0",
        "timed out",
    ]
    assert process_table([running, killed], now=1090).splitlines() == [
        "PID  TAG  STATUS            STARTED    OUTPUT  COMMAND",
        "7    web  running           1m30s ago  5B      sleep 60",
        "8    -    killed (SIGTERM)  1m30s ago  3.0MiB  sh -c x",
    ]


# --- against an installation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def sandbox(installation):
    caller = await tenant_caller(installation, f"cliproc-{installation.node}")
    gateway = await installation.address("gateway")
    client = AsyncClient(gateway, caller.key)
    sandbox = await AsyncSandbox.create(client=client)
    sandbox.gateway, sandbox.key = gateway, caller.key
    yield sandbox
    await sandbox.kill()
    await client.close()


async def mvm(sandbox, *argv: str) -> tuple[int, str, str]:
    """`mvm ARGV` as a process of its own, against the installation's gateway."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        "--gateway",
        sandbox.gateway,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MVM_API_KEY": sandbox.key},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_a_background_process_is_started_listed_attached_and_killed(sandbox):
    status, out, _ = await mvm(
        sandbox,
        "exec",
        sandbox.id,
        "-d",
        "--tag",
        "web",
        "--",
        "sh",
        "-c",
        "echo up; exec sleep 60",
    )
    pid = int(out)
    assert status == 0 and pid > 0

    status, out, _ = await mvm(sandbox, "ps", sandbox.id)
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["PID", "TAG", "STATUS"]
    assert any(row.split()[:3] == [str(pid), "web", "running"] for row in rows)
    status, out, _ = await mvm(sandbox, "ps", sandbox.id, "--json")
    listed = {p["pid"]: p for p in json.loads(out)}
    assert listed[pid]["tag"] == "web" and listed[pid]["running"] is True

    status, out, _ = await mvm(sandbox, "kill", sandbox.id, str(pid), "--signal", "TERM")
    assert status == 0 and out == f"sent SIGTERM to {pid}\n"
    # Attaching after the end replays the tail and exits with its status.
    status, out, err = await mvm(sandbox, "attach", sandbox.id, str(pid), "--tail", "4096")
    assert (status, out) == (128 + 15, "up\n")
    status, out, _ = await mvm(sandbox, "kill", sandbox.id, str(pid))
    assert out == f"{pid} had already ended\n"


async def test_attach_follows_live_output_with_stderr_apart_and_the_exit_status(sandbox):
    _, out, _ = await mvm(
        sandbox,
        "exec",
        sandbox.id,
        "-d",
        "--shell",
        "--",
        "echo out; sleep 1; echo err >&2; sleep 1; echo more; exit 4",
    )
    # With the whole buffer asked for, what came before attach connected is replayed, the rest followed live.
    status, out, err = await mvm(sandbox, "attach", sandbox.id, out.strip(), "--tail", "1048576")
    assert (status, out, err) == (4, "out\nmore\n", "err\n")


async def test_an_unknown_pid_is_one_line_and_status_2(sandbox):
    status, out, err = await mvm(sandbox, "attach", sandbox.id, "999999")
    assert status == 2 and out == "" and err.startswith("mvm: NOT_FOUND:") and "999999" in err
    assert len(err.splitlines()) == 1
    status, _, err = await mvm(sandbox, "kill", sandbox.id, "999999")
    assert status == 2 and "999999" in err


async def test_ctrl_c_detaches_attach_and_the_process_runs_on(sandbox):
    _, out, _ = await mvm(sandbox, "exec", sandbox.id, "-d", "--", "sh", "-c", "echo started; exec sleep 60")
    pid = out.strip()
    attach = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        "--gateway",
        sandbox.gateway,
        "attach",
        sandbox.id,
        pid,
        "--tail",
        "100",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MVM_API_KEY": sandbox.key},
    )
    assert await asyncio.wait_for(attach.stdout.readline(), 30) == b"started\n"
    attach.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(attach.communicate(), 30)
    assert attach.returncode == 130 and f"detached; process {pid} runs on" in err.decode()
    assert (await sandbox.commands.get(int(pid))).running
    await sandbox.commands.kill(int(pid))
