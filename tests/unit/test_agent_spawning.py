"""The agent's spawn (guest_agents/.../spawning.py): the posix_spawn path (a command in the agent's own working
directory) and the Popen path (any other directory, a user, a terminal) give the child the same things."""

from __future__ import annotations

import errno
import os
import pty
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "guest_agents" / "linux"))

from microvm_agent.spawning import Child, seal_descriptors, spawn  # noqa: E402

ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
PATHS = ["posix_spawn", "popen"]


def cwd_for(path: str, tmp_path) -> str:
    """The agent's own working directory takes posix_spawn; any other takes Popen."""
    return os.getcwd() if path == "posix_spawn" else str(tmp_path)


def read_all(fd: int | None) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def finish(child: Child) -> tuple[bytes, bytes, int]:
    out, err = read_all(child.stdout), read_all(child.stderr)
    _, status = os.waitpid(child.pid, 0)
    child.reaped(status)
    return out, err, os.waitstatus_to_exitcode(status)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("path", PATHS)
def test_output_exit_code_and_working_directory(path, tmp_path):
    cwd = cwd_for(path, tmp_path)
    child = spawn(["sh", "-c", "pwd; echo oops >&2; exit 3"], "/bin/sh", ENV, cwd, stdin=False)
    assert finish(child) == (f"{cwd}\n".encode(), b"oops\n", 3)
    if path == "popen":
        assert child.popen.returncode is not None  # told of the exit: subprocess never waits for it itself


@pytest.mark.parametrize("path", PATHS)
def test_stdin_is_a_pipe_when_asked_else_dev_null(path, tmp_path):
    child = spawn(["cat"], None, ENV, cwd_for(path, tmp_path), stdin=True)
    os.write(child.stdin, b"fed")
    os.close(child.stdin)
    assert finish(child) == (b"fed", b"", 0)
    child = spawn(["readlink", "/proc/self/fd/0"], None, ENV, cwd_for(path, tmp_path), stdin=False)
    assert child.stdin is None and finish(child) == (b"/dev/null\n", b"", 0)


@pytest.mark.parametrize("path", PATHS)
def test_a_new_session_default_signals_no_mask_and_no_descriptor_of_the_agent(path, tmp_path):
    inherited = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(inherited, True)  # as one the agent got from whatever started it
    try:
        seal_descriptors()
        script = "cat /proc/self/status; ls /proc/self/fd; echo sid $(ps -o sid= -p $$)"
        child = spawn(["sh", "-c", script], None, ENV, cwd_for(path, tmp_path), stdin=False)
        out, _, code = finish(child)
    finally:
        os.close(inherited)
    assert code == 0
    status = dict(line.split(":\t", 1) for line in out.decode().splitlines() if ":\t" in line)
    ignored = int(status["SigIgn"], 16)
    assert not ignored & (1 << 12) and not ignored & (1 << 24)  # SIGPIPE and SIGXFSZ: Python ignores them
    assert int(status["SigBlk"], 16) == 0
    lines = out.decode().splitlines()
    # ls's own directory descriptor is 3: nothing else is open in the shell's child but its standard streams.
    assert [line for line in lines if line.isdigit()] == ["0", "1", "2", "3"]
    assert lines[-1] == f"sid {child.pid}"  # the session it leads


@pytest.mark.parametrize("path", PATHS)
def test_a_failed_start_raises_the_errno_and_leaves_no_descriptor(path, tmp_path):
    before = open_fds()
    with pytest.raises(OSError) as failure:
        spawn(["missing"], "/nonexistent/missing", ENV, cwd_for(path, tmp_path), stdin=True)
    assert failure.value.errno == errno.ENOENT
    assert open_fds() == before


def test_a_terminal_is_the_controlling_terminal_and_all_three_streams(tmp_path):
    master, slave = pty.openpty()
    try:
        child = spawn(
            ["sh", "-c", "test -t 0 && test -t 1 && tty"], None, ENV, os.getcwd(), stdin=False, terminal=slave
        )
        os.close(slave)
        assert (child.stdin, child.stdout, child.stderr) == (None, None, None) and child.popen is not None
        output = b""
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the terminal closed with its last process
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(child.pid, 0)
        child.reaped(status)
        assert os.waitstatus_to_exitcode(status) == 0 and output.startswith(b"/dev/pts/")
    finally:
        os.close(master)


def test_a_removed_or_replaced_working_directory_of_the_agent_is_not_inherited(tmp_path):
    """`rm -rf /root` in a guest: the agent's directory is gone (getcwd fails), and one made again in its place is
    another directory. A start there must land in the new one, and starts elsewhere go on working."""
    home, before = tmp_path / "home", os.getcwd()
    home.mkdir()
    os.chdir(home)
    try:
        home.rmdir()
        child = spawn(["sh", "-c", "pwd"], None, ENV, str(tmp_path), stdin=False)
        assert finish(child) == (f"{tmp_path}\n".encode(), b"", 0)
        home.mkdir()
        child = spawn(["sh", "-c", "pwd; ls"], None, ENV, str(home), stdin=False)
        assert finish(child) == (f"{home}\n".encode(), b"", 0)
    finally:
        os.chdir(before)
