"""Process: a program started for one exec stream, its output pumped within the host's credit."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import pwd
import shutil
import signal
import struct
import termios
import time
from typing import TYPE_CHECKING

from microvm.agent.v1 import agent_pb2
from microvm_agent import workload
from microvm_agent.files import real
from microvm_agent.spawning import Child, spawn
from microvm_agent.streams import (
    DEFAULT_ENV,
    DRAIN_AFTER_EXIT_SECONDS,
    F_GETPIPE_SZ,
    F_SETPIPE_SZ,
    FULL_PIPE_BYTES,
    INVALID_ARGUMENT,
    MAX_TERMINAL,
    NOT_FOUND,
    OUTPUT_CHUNK,
    PIPE_BYTES,
    RESOURCE_EXHAUSTED,
    Credit,
    StreamError,
    os_error,
    write_fd,
)

if TYPE_CHECKING:
    from microvm_agent.agent import Agent


async def stop_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancels `tasks` and waits until each has ended (its `finally` blocks ran)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def validate_start(start: agent_pb2.ExecStart) -> None:
    """What the host asks to run, checked before anything is spawned: the host checks it too, but the agent is
    the guest's PID 1 and must not die of a request."""
    if not start.argv:
        raise StreamError(INVALID_ARGUMENT, "argv is empty")
    texts = [*start.argv, *start.env.keys(), *start.env.values(), start.cwd, start.user]
    if any("\x00" in text for text in texts):
        raise StreamError(INVALID_ARGUMENT, "argv, env, cwd and user must not contain NUL bytes")
    if any(not name or "=" in name for name in start.env):
        raise StreamError(INVALID_ARGUMENT, "environment names must be non-empty and without '='")
    if not (0 <= start.cols <= MAX_TERMINAL and 0 <= start.rows <= MAX_TERMINAL):
        raise StreamError(INVALID_ARGUMENT, f"terminal size {start.cols}x{start.rows} is out of range")


def grow_pipe(fd: int) -> None:
    """A pipe that was found full grows (once: it then reads more than a default pipe holds), so bulk output takes
    fewer reads and frames. Only then: the two fcntls would be most of a short command's system calls."""
    try:
        if fcntl.fcntl(fd, F_GETPIPE_SZ) < PIPE_BYTES:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # over /proc/sys/fs/pipe-max-size for an unprivileged agent: the default size serves
        pass


def no_flow_control(terminal: int) -> None:
    """Ctrl-S in a caller's input is a byte for the program, not XOFF: with the terminal's flow control on, a stray
    0x13 in an exec's stdin froze its output for good, and the process with it (blocked writing), until the call's
    deadline. Modern terminals' users rarely want XOFF; readline binds Ctrl-S to a forward search."""
    attributes = termios.tcgetattr(terminal)
    attributes[0] &= ~(termios.IXON | termios.IXOFF)  # input modes
    termios.tcsetattr(terminal, termios.TCSANOW, attributes)


class Process:
    """A process started for one exec stream."""

    def __init__(self, agent: Agent, stream_id: int, start: agent_pb2.ExecStart, traceparent: str = "") -> None:
        self.agent = agent
        self.traceparent = traceparent
        self.stream_id = stream_id
        self.start = start
        self.received_unix_ns = time.time_ns()  # made as its frame is dispatched: when the agent took it
        self.reaped_unix_ns = 0  # set by the agent's reaper
        self.credit = Credit(agent.initial_window)
        self.child: Child | None = None
        self.exit_status: asyncio.Future = asyncio.get_running_loop().create_future()
        self.timed_out = False
        self.stdin_fd: int | None = None
        self.pty_master: int | None = None
        self.stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        # The output fds still read (fd -> channel), those paused for want of credit, and the end of all of them.
        self.outputs: dict[int, int] = {}
        self.paused: set[int] = set()
        self.outputs_closed: asyncio.Future | None = None
        # Signals that arrived before the process existed: delivered right after it starts.
        self.early_signals: list[int] = []
        self.launch_error: Exception | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.exit_fd: int | None = None  # a pidfd: readable once the process has exited

    def _spawn(self) -> list[int]:
        start = self.start
        validate_start(start)
        argv = ["/bin/sh", "-c", " ".join(start.argv)] if start.shell else list(start.argv)
        user = None
        if start.user and start.user not in ("root", "0"):
            try:
                user = pwd.getpwuid(int(start.user)) if start.user.isdigit() else pwd.getpwnam(start.user)
            except KeyError:
                raise StreamError(INVALID_ARGUMENT, f"no such user {start.user!r}") from None
        home = user.pw_dir if user else "/root"
        env = dict(DEFAULT_ENV, HOME=home, USER=user.pw_name if user else "root")
        if start.pty:
            env["TERM"] = "xterm-256color"
        if self.traceparent:
            # OpenTelemetry's environment carrier: an instrumented program continues the caller's trace.
            env["TRACEPARENT"] = self.traceparent
        env.update(start.env)  # the caller's own TRACEPARENT wins
        cwd = real(start.cwd or home)
        if not os.path.isdir(cwd):
            if start.cwd:
                raise StreamError(
                    NOT_FOUND, f"working directory {start.cwd} does not exist", reason="WORKING_DIRECTORY_NOT_FOUND"
                )
            cwd = real("/")
        # Its own reason: the caller can tell a missing command from a missing sandbox (both NOT_FOUND).
        executable = None
        if "/" in argv[0]:
            if not os.path.exists(os.path.join(cwd, argv[0])):
                raise StreamError(NOT_FOUND, f"{argv[0]}: no such file", reason="COMMAND_NOT_FOUND")
        else:
            # Handed to the spawn, which then does not search PATH again with a failing execve per directory.
            executable = shutil.which(argv[0], path=env["PATH"])
            if executable is None:
                raise StreamError(NOT_FOUND, f"{argv[0]}: command not found", reason="COMMAND_NOT_FOUND")

        identity = {}
        if user:
            identity = {
                "user": user.pw_uid,
                "group": user.pw_gid,
                "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid),
            }
        slave = None
        if start.pty:
            master, slave = pty.openpty()
            self._set_size(master, start.cols or 80, start.rows or 24)
            no_flow_control(slave)
            self.pty_master = master
        try:
            with workload.current.joined():  # born in the capped cgroup
                self.child = spawn(
                    argv, executable, env, cwd, stdin=bool(start.stdin), terminal=slave, identity=identity
                )
        except BlockingIOError:  # EAGAIN from fork: the workload is at its process cap (a fork bomb, say)
            raise StreamError(
                RESOURCE_EXHAUSTED,
                f"the sandbox already runs its maximum of {workload.current.max_pids} processes and threads",
            ) from None
        except OSError as exc:  # the errno table: ENOENT NOT_FOUND, EACCES PERMISSION_DENIED, ENOEXEC INTERNAL...
            raise os_error(exc, argv[0]) from None
        finally:
            if slave is not None:
                os.close(slave)
        self.agent.children[self.child.pid] = self
        self._watch_exit()
        # Non-blocking parent ends with one fcntl each: their status flags are known to be none (a pipe's or the pty
        # master's), so there is nothing to read back first. Every system call costs tens of µs under emulation.
        child = self.child
        parent_fds = [self.pty_master] if start.pty else [child.stdout, child.stderr]
        self.stdin_fd = self.pty_master if start.pty else child.stdin
        for fd in {*parent_fds, self.stdin_fd} - {None}:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
        return parent_fds

    def _watch_exit(self) -> None:
        """The exit seen on the process's pidfd, in the loop turn that finds it: the SIGCHLD path (the wakeup pipe,
        then a callback, then the reaper) takes two more turns. That reaper stays, for kernels without pidfds and
        for every other child PID 1 adopts; whichever waits first reports the exit."""
        try:
            self.exit_fd = os.pidfd_open(self.child.pid)
        except (AttributeError, OSError):  # Linux before 5.3
            return
        asyncio.get_running_loop().add_reader(self.exit_fd, self._on_exit)

    def _on_exit(self) -> None:
        self._unwatch_exit()
        try:
            pid, status = os.waitpid(self.child.pid, os.WNOHANG)
        except ChildProcessError:  # the reaper has it already
            return
        if pid:
            self.agent.child_exited(pid, status)

    def _unwatch_exit(self) -> None:
        if self.exit_fd is not None:
            asyncio.get_running_loop().remove_reader(self.exit_fd)
            os.close(self.exit_fd)
            self.exit_fd = None

    @staticmethod
    def _set_size(fd: int, cols: int, rows: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def launch(self) -> None:
        """Spawns and starts watching the process, right as its frame is dispatched (no loop turn before the spawn).
        The output is read by reader callbacks, not tasks: under emulation every task step and future is costly, and
        a short command's whole life is a few loop turns. A failure is kept for `run` to report."""
        try:
            self._launch()
        except Exception as exc:  # noqa: BLE001 - reported by run(), as a failure inside the stream's task
            self.launch_error = exc

    def _launch(self) -> None:
        fds = self._spawn()
        loop = asyncio.get_running_loop()
        started = agent_pb2.ExecStarted(
            pid=self.child.pid, received_unix_ns=self.received_unix_ns, spawned_unix_ns=time.time_ns()
        )
        self.agent.send(self.stream_id, exec_started=started)
        for signum in self.early_signals:
            self.kill(signum)
        if self.start.timeout_ms:
            self.timer = loop.call_later(self.start.timeout_ms / 1000, self._on_timeout)
        channels = (
            [agent_pb2.OUTPUT_CHANNEL_STDOUT]
            if self.pty_master is not None
            else [agent_pb2.OUTPUT_CHANNEL_STDOUT, agent_pb2.OUTPUT_CHANNEL_STDERR]
        )
        self.outputs = dict(zip(fds, channels, strict=True))
        self.outputs_closed = loop.create_future()
        for fd in fds:
            loop.add_reader(fd, self._on_output, fd)
        if self.stdin_fd is not None:
            self.tasks.append(asyncio.create_task(self._feed_stdin()))

    async def run(self) -> None:
        """Streams the output of the process `launch` started and reports its exit."""
        if self.launch_error is not None:
            raise self.launch_error
        try:
            status = await self.exit_status
            # Let the pipes drain, but not forever: a background child may keep them open.
            if self.outputs:
                done, _ = await asyncio.wait([self.outputs_closed], timeout=DRAIN_AFTER_EXIT_SECONDS)
                if not done and self.credit.available > 0:
                    await asyncio.wait([self.outputs_closed], timeout=DRAIN_AFTER_EXIT_SECONDS)
        finally:
            if self.timer is not None:
                self.timer.cancel()
            # Also when the stream is cancelled (its host connection closed): nothing watches this process's fds
            # when they are closed. A reader left registered after the close would take the fd number from the
            # next process given it, whose output would then never be read.
            self._stop_reading()
            await stop_tasks(self.tasks)
        self._close_fds()
        exited = agent_pb2.ExecExited(
            timed_out=self.timed_out, reaped_unix_ns=self.reaped_unix_ns, sent_unix_ns=time.time_ns()
        )
        if os.WIFSIGNALED(status):
            exited.signal = os.WTERMSIG(status)
        else:
            exited.exit_code = os.WEXITSTATUS(status)
        self.agent.send(self.stream_id, exec_exited=exited)

    def _on_output(self, fd: int) -> None:
        """`fd` is readable: one read within the host's credit, sent as one frame."""
        if self.credit.available <= 0:
            # Out of credit: stop watching until the host grants more. The pipe fills and the process waits on it,
            # and a quiet stdout never starves a busy stderr since credit is only spent on data that is there.
            asyncio.get_running_loop().remove_reader(fd)
            self.paused.add(fd)
            return
        try:
            data = os.read(fd, min(OUTPUT_CHUNK, self.credit.available))
        except BlockingIOError:
            return
        except OSError:  # EIO from a pty master whose terminal has closed: its end
            data = b""
        if not data:
            self._end_output(fd)
            return
        if len(data) >= FULL_PIPE_BYTES and self.pty_master is None:
            grow_pipe(fd)
        self.credit.available -= len(data)
        self.agent.send(self.stream_id, output=agent_pb2.Output(channel=self.outputs[fd], data=data))

    def _end_output(self, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        self.outputs.pop(fd, None)
        self.paused.discard(fd)
        if not self.outputs and not self.outputs_closed.done():
            self.outputs_closed.set_result(None)

    def _granted(self, increment: int) -> None:
        self.credit.grant(increment)
        if self.paused and self.credit.available > 0:
            loop = asyncio.get_running_loop()
            for fd in self.paused:
                loop.add_reader(fd, self._on_output, fd)
            self.paused.clear()

    def _stop_reading(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self.outputs:
            loop.remove_reader(fd)
        self.outputs.clear()
        self.paused.clear()

    async def _feed_stdin(self) -> None:
        while True:
            data = await self.stdin_queue.get()
            if data is None:
                if self.pty_master is None:
                    os.close(self.stdin_fd)
                    self.child.stdin = None
                else:
                    await write_fd(self.stdin_fd, b"\x04")  # ^D: end of input for the terminal
                self.stdin_fd = None
                return
            try:
                await write_fd(self.stdin_fd, data)
            except (BrokenPipeError, OSError):
                return

    def _close_fds(self) -> None:
        self._unwatch_exit()
        if self.pty_master is not None:
            try:
                os.close(self.pty_master)
            except OSError:
                pass
            self.pty_master = None
        if self.child:
            for fd in (self.child.stdout, self.child.stderr, self.child.stdin):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.child.stdout = self.child.stderr = self.child.stdin = None

    def _on_timeout(self) -> None:
        if not self.exit_status.done():
            self.timed_out = True
            self.kill(signal.SIGKILL)

    def kill(self, signum: int) -> None:
        if self.child and not self.exit_status.done():
            try:
                os.killpg(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def handle(self, frame: agent_pb2.Frame) -> None:
        body = frame.WhichOneof("body")
        if body == "stdin":
            if frame.stdin.data:
                self.stdin_queue.put_nowait(frame.stdin.data)
            if frame.stdin.eof:
                self.stdin_queue.put_nowait(None)
        elif body == "signal":
            if self.child is None:
                self.early_signals.append(frame.signal.signal)
            elif not self.exit_status.done():
                try:
                    os.killpg(self.child.pid, frame.signal.signal)
                except (ProcessLookupError, OSError):
                    pass
        elif body == "resize":
            if not (0 <= frame.resize.cols <= MAX_TERMINAL and 0 <= frame.resize.rows <= MAX_TERMINAL):
                return  # a size no terminal has: ignored, the process runs on
            if self.pty_master is not None:
                self._set_size(self.pty_master, frame.resize.cols or 80, frame.resize.rows or 24)
            else:  # not started yet: start at this size
                self.start.cols, self.start.rows = frame.resize.cols, frame.resize.rows
        elif body == "window_update":
            self._granted(frame.window_update.increment)
