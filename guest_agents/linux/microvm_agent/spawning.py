"""Starting a program for an exec: `posix_spawn` where it can, `subprocess.Popen` where it must.

Under emulation Python code is the cost of a spawn, not the kernel: `Popen(["true"])` + wait with pipes, a new
session and the cgroup step took 5.7-5.9 ms in a guest here, the same done by `os.posix_spawn` 3.5-3.8 ms, and
`posix_spawn("/bin/true")` alone 3.0-3.2 ms (one run, 150 each). Both use vfork, so the difference is Popen's
Python around it (its handles, its error pipe, its file objects).

`posix_spawn` cannot change the working directory or the user, and has no terminal step: a process started in
the agent's own working directory (the default: root's home; checked by inode on every start) as the agent's
user, without a terminal, takes it; every other start goes through Popen as before. What the child gets is the
same either way: a new session, the standard streams asked for and no other descriptor of the agent's (every one
is close-on-exec: Python makes them so, and `seal_descriptors` marks what the agent inherited), SIGPIPE and
SIGXFSZ back at their defaults (Python ignores them), an empty signal mask.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import termios
from dataclasses import dataclass

# Python ignores these at startup; Popen's restore_signals puts them back for the child, and so do we.
RESTORED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))


@dataclass
class Child:
    """A started program: its pid, and the agent's ends of the pipes to its standard streams (None: not a pipe)."""

    pid: int
    stdin: int | None
    stdout: int | None
    stderr: int | None
    popen: subprocess.Popen | None = None  # when Popen started it: told about the exit, so it never waits itself

    def reaped(self, status: int) -> None:
        if self.popen is not None:
            self.popen.returncode = status


def seal_descriptors() -> None:
    """Marks close-on-exec every descriptor above 2 the agent has now: those it inherited (from the initramfs, or
    a test's process) would otherwise reach what posix_spawn starts. Python opens its own so already."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


def spawn(
    argv: list[str],
    executable: str | None,
    env: dict[str, str],
    cwd: str,
    *,
    stdin: bool,
    terminal: int | None = None,
    identity: dict | None = None,
) -> Child:
    """Starts `argv` (`executable`, else found in `env`'s PATH) in a new session with pipes for stdout and stderr,
    and for stdin when `stdin` (else /dev/null); or with `terminal` (a pty's slave) as all three and as its
    controlling terminal. `identity`: Popen's user, group and extra_groups to switch to. Raises OSError as the
    start failed (BlockingIOError: no process slot is left)."""
    if terminal is None and not identity and in_working_directory(cwd):
        if executable is None and "/" not in argv[0]:  # searched in the child's PATH, as Popen does
            executable = shutil.which(argv[0], path=env.get("PATH", os.defpath)) or argv[0]
        return _piped(stdin, lambda fds: (_posix_spawn(argv, executable or argv[0], env, *fds), None))
    if terminal is not None:
        popen = _popen(argv, executable, env, cwd, identity, terminal, terminal, terminal, take_terminal)
        return Child(pid=popen.pid, stdin=None, stdout=None, stderr=None, popen=popen)

    def start(fds: tuple) -> tuple[int, subprocess.Popen]:
        stdin_fd, stdout_fd, stderr_fd = fds
        popen = _popen(
            argv, executable, env, cwd, identity, subprocess.DEVNULL if stdin_fd is None else stdin_fd, *fds[1:]
        )
        return popen.pid, popen

    return _piped(stdin, start)


def _piped(stdin: bool, start) -> Child:
    """A child started by `start((stdin, stdout, stderr))` on new pipes (stdin None: none asked for), which returns
    its pid and Popen (or None). The child's ends are closed once it has its copies; ours too if it did not start."""
    pipes = _pipes(3 if stdin else 2)
    (out_read, out_write), (err_read, err_write) = pipes[0], pipes[1]
    in_read, in_write = pipes[2] if stdin else (None, None)
    try:
        pid, popen = start((in_read, out_write, err_write))
    except BaseException:
        _close(out_read, err_read, in_write)
        raise
    finally:
        _close(out_write, err_write, in_read)
    return Child(pid=pid, stdin=in_write, stdout=out_read, stderr=err_read, popen=popen)


def in_working_directory(path: str) -> bool:
    """Whether `path` is the directory the agent works in now, the one a posix_spawned child starts in. By inode,
    not name: a caller may have removed the agent's directory (`rm -rf /root`, then getcwd fails) or put another
    in its place, and a child must not start in a deleted directory."""
    try:
        here, there = os.stat("."), os.stat(path)
    except OSError:
        return False
    return here.st_nlink > 0 and (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)


def take_terminal() -> None:
    """In the child, before exec: the pty slave on its stdin becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _popen(argv, executable, env, cwd, identity, stdin, stdout, stderr, preexec=None) -> subprocess.Popen:
    # Without a preexec function subprocess uses vfork, which under emulation is many times cheaper than forking
    # the agent: only the rare terminal case pays for one.
    return subprocess.Popen(
        argv,
        executable=executable,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        preexec_fn=preexec,
        **(identity or {}),
    )


def _pipes(count: int) -> list[tuple[int, int]]:
    made: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            made.append(os.pipe())
    except OSError:
        _close(*(fd for pair in made for fd in pair))
        raise
    return made


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _posix_spawn(argv: list[str], path: str, env: dict[str, str], stdin: int | None, stdout: int, stderr: int) -> int:
    actions: list[tuple] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0) if stdin is None else (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True, setsigdef=RESTORED_SIGNALS, setsigmask=())
