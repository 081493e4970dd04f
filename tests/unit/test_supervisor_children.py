"""services/supervisor/children.child_spawn: a supervised child dies with its supervisor, and is spawned without a fork
of the supervisor (whose gRPC threads' fork handlers once aborted a child before its exec)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from services.supervisor import children

PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from services.supervisor.children import child_spawn

    async def main():
        argv, preexec = child_spawn(["sleep", "300"])
        child = await asyncio.create_subprocess_exec(*argv, preexec_fn=preexec)
        print(child.pid, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def program(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")[0].rsplit(b"/", 1)[-1]


def test_a_child_gets_sigterm_when_its_supervisor_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        # setpriv execs the command itself (same pid), once it has set the signal: wait for that exec
        deadline = time.monotonic() + 30
        while program(child) != b"sleep" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert program(child) == b"sleep", "setpriv execs the command itself: same pid"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the orphan was not told to stop"
    finally:
        parent.kill()


def test_child_spawn_uses_setpriv_where_there_is_one_else_a_prctl_in_the_fork():
    if children.SETPRIV is None:
        pytest.skip("setpriv is missing: the other test covers the prctl path")
    argv, preexec = children.child_spawn(["true"])
    assert argv[:4] == [children.SETPRIV, "--pdeathsig", "TERM", "--"] and preexec is None
    saved, children.SETPRIV = children.SETPRIV, None
    try:
        assert children.child_spawn(["true"]) == (["true"], children._die_with_parent)
    finally:
        children.SETPRIV = saved
