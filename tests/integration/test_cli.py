"""`mvm` as a user runs it (a subprocess) against the real stack: options anywhere before `--`, JSON and tables,
several ids with failures among them, one-line errors, timeouts, snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.guest


class Mvm:
    def __init__(self, stack) -> None:
        self.env = dict(os.environ, MVM_GATEWAY=stack.gateway_address, MVM_API_KEY=stack.admin_key)

    def __call__(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mvm_cli.main", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env,
        )

    def ok(self, *argv: str) -> str:
        result = self(*argv)
        assert result.returncode == 0, f"mvm {' '.join(argv)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout


@pytest.fixture(scope="module")
def mvm(stack):
    return Mvm(stack)


@pytest.fixture(scope="module")
def run_label():
    return f"suite=cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def sandbox_id(mvm, run_label):
    sandbox_id = mvm.ok("create", "--env", "GREETING=hi there", "--label", run_label, "--timeout", "15m").strip()
    yield sandbox_id
    mvm("rm", sandbox_id)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("mvm: "), lines
    return lines[0]


def test_exec_options_after_the_id_and_the_sandbox_env(mvm, sandbox_id):
    out = mvm.ok("exec", sandbox_id, "--env", "K=V", "--", "sh", "-c", 'echo "$K $GREETING"')
    assert out == "V hi there\n"
    assert mvm.ok("exec", "-e", "K=first", sandbox_id, "printenv", "K") == "first\n"  # no `--` needed
    assert mvm("exec", sandbox_id, "--", "sh", "-c", "exit 3").returncode == 3
    missing = mvm("exec", sandbox_id, "--", "no-such-program")  # as a shell says it, and docker run
    assert missing.returncode == 127 and "no-such-program" in one_line_error(missing)
    gone = mvm("exec", "no-such-sandbox", "--", "true")
    assert gone.returncode == 125
    assert one_line_error(gone) == "mvm: NOT_FOUND: sandbox no-such-sandbox does not exist"
    assert mvm.ok("exec", sandbox_id, "--no-stdin", "--", "echo", "--env", "-n") == "--env -n\n"  # after --: theirs


def test_exec_timeout_kills_the_process_and_the_old_flag_still_works(mvm, sandbox_id):
    for flag in ("--timeout", "--exec-timeout"):
        result = mvm("exec", sandbox_id, flag, "1", "--", "sleep", "60")
        assert result.returncode == 128 + 9, (flag, result.returncode, result.stderr)
        assert "killed by its timeout" in result.stderr


def test_ls_and_get_as_table_and_json(mvm, sandbox_id, run_label):
    rows = mvm.ok("ls", "--label", run_label).splitlines()
    assert [row.split()[:2] for row in rows] == [["ID", "STATE"], [sandbox_id, "RUNNING"]]
    assert mvm.ok("ls", "--label", run_label, "--no-headers").split()[:2] == [sandbox_id, "RUNNING"]
    assert mvm.ok("ls", "--label", run_label, "-q").split() == [sandbox_id]
    listed = json.loads(mvm.ok("ls", "--json", "--label", run_label))
    assert [s["name"] for s in listed] == [f"sandboxes/{sandbox_id}"]
    shown = json.loads(mvm.ok("get", sandbox_id, "--json"))
    assert shown["state"] == "SANDBOX_STATE_RUNNING" and shown["env"] == {"GREETING": "hi there"}
    assert shown["labels"] == dict([run_label.split("=")])
    view = mvm.ok("get", sandbox_id)
    assert "id:" in view and sandbox_id in view and "GREETING=hi there" in view
    assert mvm.ok("ls", "--state", "paused", "--label", run_label, "-q") == ""


def test_timeout_moves_the_expiry(mvm, sandbox_id):
    out = mvm.ok("timeout", sandbox_id, "2h")
    assert out.startswith(f"{sandbox_id} expires at ") and "(in 1h59m" in out
    expire = json.loads(mvm.ok("get", sandbox_id, "--json"))["expireTime"]
    left = datetime.fromisoformat(expire.replace("Z", "+00:00")) - datetime.now(UTC)
    assert left.total_seconds() > 3600
    bad = mvm("timeout", sandbox_id, "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    mvm.ok("timeout", sandbox_id, "15m")


def test_errors_are_one_line_and_name_the_missing_sandbox(mvm):
    missing = mvm("get", "no-such-sandbox")
    assert missing.returncode == 2
    assert one_line_error(missing) == "mvm: NOT_FOUND: sandbox no-such-sandbox does not exist"
    debug = mvm("--debug", "get", "no-such-sandbox")
    assert "Traceback" in debug.stderr and debug.stderr.strip().endswith("does not exist")
    unreachable = Mvm.__new__(Mvm)
    unreachable.env = dict(mvm.env, MVM_GATEWAY="127.0.0.1:1")
    down = unreachable("ls")
    assert down.returncode == 1 and "cannot reach the gateway at 127.0.0.1:1" in one_line_error(down)


def test_rm_pause_and_resume_go_on_after_a_failure(mvm, run_label):
    first, second = (mvm.ok("create", "--label", run_label).strip() for _ in range(2))
    paused = mvm("pause", first, "no-such-sandbox", second)
    assert paused.returncode == 2
    assert paused.stdout.splitlines() == [f"paused {first}", f"paused {second}"]
    assert paused.stderr.splitlines() == [
        "mvm: pause no-such-sandbox: NOT_FOUND: sandbox no-such-sandbox does not exist",
        "mvm: pause: 1 of 3 sandboxes failed",
    ]
    assert mvm.ok("resume", first) == f"resumed {first}\n"
    removed = mvm("rm", first, "no-such-sandbox", second)
    assert removed.returncode == 2
    assert removed.stdout.splitlines() == [f"deleted {first}", f"deleted {second}"]
    assert removed.stderr.splitlines()[-1] == "mvm: rm: 1 of 3 sandboxes failed"
    assert mvm("get", first).returncode == 2 and mvm("get", second).returncode == 2


def test_snapshots_list_show_and_rm_and_fork_leaves_none(mvm, sandbox_id):
    snapshot_id = mvm.ok("snapshot", sandbox_id, "--label", "step=1").strip()
    listed = json.loads(mvm.ok("snapshots", "--sandbox", sandbox_id, "--json"))
    assert f"snapshots/{snapshot_id}" in [s["name"] for s in listed]
    assert snapshot_id in mvm.ok("snapshots", "ls", "--sandbox", sandbox_id)
    assert json.loads(mvm.ok("snapshots", "get", snapshot_id, "--json"))["labels"] == {"step": "1"}
    removed = mvm("snapshots", "rm", snapshot_id, "snap-000000000000")
    assert removed.returncode == 2 and removed.stdout == f"deleted {snapshot_id}\n"
    assert "snap-000000000000" in removed.stderr and "1 of 2 snapshots failed" in removed.stderr
    assert mvm.ok("snapshots", "--sandbox", sandbox_id, "-q") == ""

    (forked,) = json.loads(mvm.ok("fork", sandbox_id, "--json"))
    clone = forked["name"].removeprefix("sandboxes/")
    assert forked["state"] == "SANDBOX_STATE_RUNNING" and forked["env"] == {"GREETING": "hi there"}
    try:
        assert mvm.ok("exec", clone, "--", "sh", "-c", "echo $GREETING") == "hi there\n"
        assert mvm.ok("snapshots", "--sandbox", sandbox_id, "-q") == ""  # the fork's snapshot is gone
    finally:
        mvm("rm", clone)


def test_run_creates_runs_and_deletes(mvm, sandbox_id, run_label):
    result = mvm("run", "--label", run_label, "--env", "A=1", "--", "sh", "-c", "echo $A; exit 4")
    assert (result.returncode, result.stdout) == (4, "1\n"), result.stderr
    assert mvm.ok("ls", "--label", run_label, "-q").split() == [sandbox_id]  # its own sandbox is gone


def test_templates_lists_what_create_takes(mvm):
    assert [row.split()[0] for row in mvm.ok("templates").splitlines()] == ["TEMPLATE", "default"]
    (default,) = json.loads(mvm.ok("templates", "--json"))
    assert default["name"] == "templates/default" and default["nodes"] and int(default["diskBytes"]) > 0


def test_exec_with_a_terminal_runs_interactively(mvm, sandbox_id):
    """`mvm exec -t` on a terminal: the remote process gets a pty of its own and its output comes back."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: mvm on the terminal pty.fork made
        os.execve(sys.executable, [sys.executable, "-m", "mvm_cli.main", "exec", "-t", sandbox_id, "--",
                                   "sh", "-c", "tty; echo interactive; exit 5"], mvm.env)  # fmt: skip
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 5, output
    assert b"/dev/pts/" in output and b"interactive" in output
