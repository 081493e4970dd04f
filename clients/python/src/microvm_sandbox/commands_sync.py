"""`sandbox.commands` for synchronous code (`Sandbox.commands`): `Commands` and `CommandHandle`, the twins of
`AsyncCommands` and `AsyncCommandHandle` (microvm_sandbox.commands), run on the sync SDK's loop. Output callbacks run
in the calling thread."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Iterator, Sequence
from typing import Literal, overload

from microvm_sandbox.commands import AsyncCommandHandle, AsyncCommands, ProcessInfo
from microvm_sandbox.errors import InvalidArgumentError, TimeoutError
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecEvent, ExecResult, Stderr, Stdout
from microvm_sandbox.output import OutputCallback, Runner, collect


class CommandHandle:
    """A background process being followed, for synchronous code (see `AsyncCommandHandle`). on_stdout/on_stderr
    given to `run` or `connect` are called by `wait()`, in the calling thread, with each chunk (those that came
    before it first); iterating the handle instead yields the chunks and the exit."""

    def __init__(
        self,
        inner: AsyncCommandHandle,
        run: Runner,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self.aio, self._run = inner, run
        self._on_stdout, self._on_stderr = on_stdout, on_stderr

    @property
    def pid(self) -> int:
        """The process's id in the guest."""
        return self.aio.pid

    @property
    def tag(self) -> str:
        """The tag it was started with."""
        return self.aio.tag

    @property
    def stdout(self) -> str:
        """Standard output so far, decoded as UTF-8."""
        return self.aio.stdout

    @property
    def stderr(self) -> str:
        """Standard error so far, decoded as UTF-8."""
        return self.aio.stderr

    @property
    def exit_code(self) -> int | None:
        """The exit status once its end arrived; None before."""
        return self.aio.exit_code

    @property
    def finished(self) -> bool:
        """The process's end arrived here (or following failed)."""
        return self.aio.finished

    def __iter__(self) -> Iterator[ExecEvent]:
        while True:
            try:
                yield self._run(self.aio.__anext__())
            except StopAsyncIteration:
                return

    def wait(self, timeout: float | None = None) -> ExecResult:
        """The result once the process ends (see `AsyncCommandHandle.wait`), calling on_stdout/on_stderr here with
        each chunk as it arrives. timeout: seconds to wait at most (TimeoutError; the process runs on)."""
        if self._on_stdout is not None or self._on_stderr is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = self._run(asyncio.wait_for(self.aio.__anext__(), left))
                except StopAsyncIteration:
                    break
                except builtins.TimeoutError:
                    raise TimeoutError(
                        f"process {self.pid} still runs after {timeout:g} s", code="DEADLINE_EXCEEDED"
                    ) from None
                callback = self._on_stdout if isinstance(event, Stdout) else self._on_stderr
                if isinstance(event, (Stdout, Stderr)) and callback is not None:
                    callback(event.data)
        result: ExecResult = self._run(self.aio.wait(timeout))
        return result

    def kill(self) -> bool:
        """Kills the process (SIGKILL). True when it was running, False when it had already ended."""
        return bool(self._run(self.aio.kill()))

    def signal(self, signal: int) -> ProcessInfo:
        """Sends `signal` (1..64) to the process; returns it as it is then."""
        info: ProcessInfo = self._run(self.aio.signal(signal))
        return info

    def send_stdin(self, data: bytes | str) -> None:
        """Writes `data` (str: UTF-8) to its stdin (started with stdin=True)."""
        self._run(self.aio.send_stdin(data))

    def close_stdin(self) -> None:
        """Closes its stdin (end of input)."""
        self._run(self.aio.close_stdin())

    def disconnect(self) -> None:
        """Stops following; the process runs on."""
        self._run(self.aio.disconnect())

    def __repr__(self) -> str:
        return f"<CommandHandle pid={self.pid} tag={self.tag!r}>"


class Commands:
    """The processes of one sandbox, for synchronous code (`Sandbox.commands`): the methods of `AsyncCommands`.
    Output callbacks run in the calling thread."""

    def __init__(self, inner: AsyncCommands, run: Runner) -> None:
        self.aio, self._run = inner, run

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult: ...

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult | CommandHandle:
        """Runs `cmd` to its end (an ExecResult), or with background=True returns at once with a CommandHandle
        (see `AsyncCommands.run`). on_stdout/on_stderr are called in this thread: as output arrives in the
        foreground, by the handle's `wait()` in the background."""
        if background:
            inner = self._run(
                self.aio.run(
                    cmd,
                    background=True,
                    envs=envs,
                    cwd=cwd,
                    user=user,
                    timeout=timeout,
                    stdin=stdin,
                    tag=tag,
                    max_output_bytes=max_output_bytes,
                )
            )
            return CommandHandle(inner, self._run, on_stdout, on_stderr)
        if on_stdout is None and on_stderr is None:
            result: ExecResult = self._run(
                self.aio.run(
                    cmd,
                    envs=envs,
                    cwd=cwd,
                    user=user,
                    timeout=timeout,
                    stdin=stdin,
                    tag=tag,
                    max_output_bytes=max_output_bytes,
                )
            )
            return result
        if stdin is True or tag:
            raise InvalidArgumentError("stdin=True and tag are for background processes: run with background=True")
        stream = self.aio._sandbox.exec_stream(
            cmd,
            env=envs,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin or b"",
            max_output_bytes=max_output_bytes,
        )
        return collect(stream, self._run, on_stdout, on_stderr, max_output_bytes)

    def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool = False,
        tag: str = "",
    ) -> ProcessInfo:
        """Starts `cmd` in the background without following it; returns it at once."""
        info: ProcessInfo = self._run(
            self.aio.start(cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, stdin=stdin, tag=tag)
        )
        return info

    def list(self) -> builtins.list[ProcessInfo]:
        """The background processes, running and the last 32 that ended, oldest first."""
        found: builtins.list[ProcessInfo] = self._run(self.aio.list())
        return found

    def get(self, pid: int) -> ProcessInfo:
        """One background process. ProcessNotFound when there is none with that pid."""
        info: ProcessInfo = self._run(self.aio.get(pid))
        return info

    def connect(
        self,
        pid: int,
        *,
        tail_bytes: int = 0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> CommandHandle:
        """Follows a background process again, from up to `tail_bytes` of its newest output (see
        `AsyncCommands.connect`); the callbacks are called by the handle's `wait()`."""
        inner = self._run(self.aio.connect(pid, tail_bytes=tail_bytes, max_output_bytes=max_output_bytes))
        return CommandHandle(inner, self._run, on_stdout, on_stderr)

    def signal(self, pid: int, signal: int) -> ProcessInfo:
        """Sends `signal` (1..64) to a background process; returns it as it is then."""
        info: ProcessInfo = self._run(self.aio.signal(pid, signal))
        return info

    def kill(self, pid: int) -> bool:
        """Kills a background process (SIGKILL). True when it was running, False when it had already ended."""
        return bool(self._run(self.aio.kill(pid)))

    def send_stdin(self, pid: int, data: bytes | str) -> None:
        """Writes `data` to the stdin of a background process started with stdin=True."""
        self._run(self.aio.send_stdin(pid, data))

    def close_stdin(self, pid: int) -> None:
        """Closes the stdin of a background process."""
        self._run(self.aio.close_stdin(pid))


__all__ = ["CommandHandle", "Commands"]
