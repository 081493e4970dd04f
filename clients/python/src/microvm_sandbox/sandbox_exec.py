"""A sandbox's process methods, mixed into the sandbox classes: `exec_stream` and `exec` (one command), `commands`
(E2B-style processes, background ones included), `pty` (terminals) and `run_script` (code run once by its language's
interpreter; `run_code` keeps state in a kernel: microvm_sandbox.code). Async (`AsyncExecMethods`) and sync
(`ExecMethods`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox import languages
from microvm_sandbox.commands import AsyncCommands
from microvm_sandbox.commands_sync import Commands
from microvm_sandbox.errors import SandboxError
from microvm_sandbox.exec_stream import AsyncExecStream, ExecStream, command_argv, duration
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecResult, Exited, Stderr, Stdout
from microvm_sandbox.output import OutputCallback, collect, deliver
from microvm_sandbox.terminal import AsyncPty, Pty

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.client import AsyncClient
    from microvm_sandbox.sync_loop import Loop


class AsyncExecMethods:
    """`AsyncSandbox`'s process methods (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bytes = b"",
        max_output_bytes: int = 0,
    ) -> AsyncExecStream:
        """Runs `command` and yields its events as they happen: Started, Stdout/Stderr chunks, then Exited.

        command: a string runs through /bin/sh -c; a list is argv (argv[0] looked up in PATH). env: added to
        the sandbox's environment. cwd, user: working directory and user (default /root, root). timeout:
        seconds before the process is killed (Exited.timed_out). stdin: bytes fed to it, then closed.
        max_output_bytes: forward at most this much output (0, the default: all); the rest is dropped without
        slowing the process, and Exited.truncated says so.
        Stopping the iteration early cancels the call and the server kills the process. Without `timeout` the
        call itself gives up after an hour (TimeoutError, the process killed): pass one for longer runs."""
        argv, shell = command_argv(command)
        process = api.ProcessConfig(argv=argv, shell=shell, env=env or {}, cwd=cwd, user=user)
        if timeout:
            process.timeout.CopyFrom(duration(timeout))
        request = api.ExecRequest(sandbox=self.name, process=process, stdin=stdin, max_output_bytes=max_output_bytes)

        def start() -> Any:
            return self.client.stub.Exec(request, metadata=self.client.metadata, timeout=(timeout or 3600) + 30)

        return AsyncExecStream(start)

    async def exec(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bytes = b"",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Runs `command` to its end and returns its output and exit status (see `exec_stream` for the
        arguments). on_stdout/on_stderr: called with each chunk as it arrives (plain or async functions).
        max_output_bytes: output kept, stdout and stderr together (default 16 MiB; 0: all); beyond it the rest is
        dropped (the process is not slowed) and the result says `truncated`, with `output_bytes` written in all.
        A missing program raises CommandNotFound; a non-zero exit is a result, not an error."""
        stdout, stderr = bytearray(), bytearray()
        stream = self.exec_stream(
            command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, max_output_bytes=max_output_bytes
        )
        async with stream:
            async for event in stream:
                if isinstance(event, Stdout):
                    stdout += event.data
                    await deliver(on_stdout, event.data)
                elif isinstance(event, Stderr):
                    stderr += event.data
                    await deliver(on_stderr, event.data)
                elif isinstance(event, Exited):
                    return ExecResult.of(stdout, stderr, event)
        raise SandboxError("the process stream ended without an exit status", code="UNAVAILABLE")

    @property
    def commands(self) -> AsyncCommands:
        """The sandbox's processes, E2B-style: `run` (foreground, or background=True for a handle), `list`,
        `connect` (follow a background process again), `kill`, `signal`, `send_stdin` (microvm_sandbox.commands)."""
        return AsyncCommands(cast("AsyncSandbox", self))

    @property
    def pty(self) -> AsyncPty:
        """Terminals in the sandbox: `pty.create(cols=, rows=, cmd=, on_data=)` (microvm_sandbox.terminal)."""
        return AsyncPty(cast("AsyncSandbox", self))

    async def run_script(
        self,
        language: str,
        code: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Runs `code` once in a fresh interpreter of its language (no state kept between calls: `run_code` keeps it
        in a kernel): python (python3, py), bash, sh (shell), javascript (js, node, nodejs), ruby (rb), perl (pl).
        InvalidArgumentError for another language; CommandNotFound (naming language and interpreter) when the
        interpreter is not installed in the sandbox. Other arguments as in `exec`."""
        lang = languages.language(language)
        result = await self.exec(
            languages.argv(lang, code),
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        return languages.checked(lang, result)


class ExecMethods:
    """`Sandbox`'s process methods (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bytes = b"",
        max_output_bytes: int = 0,
    ) -> ExecStream:
        """Runs `command` and yields its events as they happen (see `AsyncSandbox.exec_stream`). Stopping the
        loop early cancels the call and the server kills the process."""
        inner = self.aio.exec_stream(
            command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, max_output_bytes=max_output_bytes
        )
        return ExecStream(inner)

    def exec(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bytes = b"",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Runs `command` to its end (see `AsyncSandbox.exec`), keeping at most `max_output_bytes` of output
        (default 16 MiB, 0: all; the result says `truncated`). on_stdout/on_stderr are called in this thread
        with each chunk as it arrives."""
        if on_stdout is None and on_stderr is None:
            inner = self.aio.exec(
                command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, max_output_bytes=max_output_bytes
            )
            return self._loop.run(inner)
        stream = self.aio.exec_stream(
            command, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, max_output_bytes=max_output_bytes
        )
        return collect(stream, self._loop.run, on_stdout, on_stderr, max_output_bytes)

    @property
    def commands(self) -> Commands:
        """The sandbox's processes (see `microvm_sandbox.commands`): run (foreground or background), list, connect,
        kill, signal, send_stdin."""
        return Commands(self.aio.commands, self._loop.run)

    @property
    def pty(self) -> Pty:
        """Terminals in the sandbox: `pty.create(cols=, rows=, cmd=, on_data=)` (see `microvm_sandbox.terminal`)."""
        return Pty(self.aio.pty, self._loop.run)

    def run_script(
        self,
        language: str,
        code: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Runs `code` with the language's interpreter once (see `AsyncSandbox.run_script` for the languages).
        CommandNotFound, naming language and interpreter, when the interpreter is not installed."""
        lang = languages.language(language)
        result = self.exec(
            languages.argv(lang, code),
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        return languages.checked(lang, result)
