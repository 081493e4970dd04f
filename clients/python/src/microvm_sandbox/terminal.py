"""Terminals in a sandbox, E2B-style: `sandbox.pty.create(...)` (async: `AsyncPty`, sync: `Pty`).

    async with AsyncSandbox.create() as sb:
        term = await sb.pty.create(cols=100, rows=30, on_data=lambda data: print(data.decode(), end=""))
        await term.send_input(b"echo hi; exit\\n")
        await term.resize(120, 40)
        result = await term.wait()                     # result.stdout: everything the terminal printed

A terminal is one ExecInteractive call with `process.pty` set: stdout and stderr come merged, as a terminal shows
them; it lives as long as the call (`kill()`, or cancelling, ends the process). For processes that outlive their
caller see `sandbox.commands.run(..., background=True)`.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.commands import process_config
from microvm_sandbox.errors import SandboxError, TimeoutError, from_rpc_error
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecEvent, ExecResult, Exited, Started, Stdout, exec_event
from microvm_sandbox.output import EventBuffer, OutputCallback, OutputCollector, Runner, deliver

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox

DEFAULT_TERM = "xterm-256color"


class AsyncPtyHandle:
    """A process on a terminal: `pid`; `send_input()`, `resize()`, `signal()`, `kill()`; `wait()` for its result
    (everything it printed, at most `max_output_bytes`); `async for event in handle` yields its `Stdout` chunks and
    its `Exited`. on_data is called with each chunk as it arrives."""

    def __init__(
        self, call: Any, requests: asyncio.Queue[api.ExecInteractiveRequest | None], pid: int, on_data: Any, limit: int
    ) -> None:
        self.pid = pid
        self._call, self._requests, self._on_data = call, requests, on_data
        self._output = OutputCollector(limit)
        self._events = EventBuffer(limit)
        self._result: ExecResult | None = None
        self._error: BaseException | None = None
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:  # read() began in `create`
                event = exec_event(response.event)
                if isinstance(event, Stdout):
                    self._output.add(event)
                    await deliver(self._on_data, event.data)
                    self._events.put(event)
                elif isinstance(event, Exited):
                    self._result = self._output.result(event)
                    self._events.put(event)
                    self._events.put(None)
                    return
            raise SandboxError("the terminal's stream ended without an exit status", code="UNAVAILABLE")
        except grpc.aio.AioRpcError as error:
            self._error = from_rpc_error(error)
            self._events.put(self._error)
        except BaseException as error:  # on_data failed, or the SDK was cancelled
            self._error = error
            self._call.cancel()
            self._events.put(error if isinstance(error, Exception) else None)
            if not isinstance(error, Exception):
                raise
        finally:
            self._requests.put_nowait(None)

    async def _send(self, **request: Any) -> None:
        if self._task.done():
            raise SandboxError(f"the terminal of process {self.pid} has ended", code="FAILED_PRECONDITION")
        await self._requests.put(api.ExecInteractiveRequest(**request))

    @property
    def output(self) -> str:
        """What the terminal printed so far (what `wait()` keeps), decoded as UTF-8."""
        return self._output.stdout.decode(errors="replace")

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process ended; None before (or when a signal ended it)."""
        return self._result.exit_code if self._result is not None else None

    async def send_input(self, data: bytes | str) -> None:
        """Types `data` (str: UTF-8) into the terminal (b"\\x03" is Ctrl-C, b"\\x04" Ctrl-D)."""
        await self._send(stdin=data.encode() if isinstance(data, str) else data)

    async def resize(self, cols: int, rows: int) -> None:
        """Changes the terminal's size (the process gets SIGWINCH)."""
        await self._send(resize=api.TerminalSize(cols=cols, rows=rows))

    async def signal(self, signal: int) -> None:
        """Sends `signal` (e.g. 2, SIGINT) to the process."""
        await self._send(signal=signal)

    async def close_input(self) -> None:
        """Closes the terminal's input (end of input)."""
        await self._send(close_stdin=api.CloseStdin())

    async def kill(self) -> bool:
        """Ends the process (SIGKILL) and waits for its end. True when it was running, False when it had ended."""
        if self._task.done():
            return False
        try:
            await self._send(signal=9)
        except SandboxError:
            return False
        await asyncio.wait([self._task], timeout=10)
        if not self._task.done():
            self._call.cancel()  # the call's end kills the process too
            await asyncio.wait([self._task])
        return True

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """The result once the process ends: `stdout` holds everything the terminal printed (at most
        `max_output_bytes`), `stderr` is empty. timeout: seconds to wait at most (TimeoutError; it runs on)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except builtins.TimeoutError:
            raise TimeoutError(f"process {self.pid} still runs after {timeout:g} s", code="DEADLINE_EXCEEDED") from None
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def __aiter__(self) -> AsyncPtyHandle:
        return self

    async def __anext__(self) -> ExecEvent:
        return await self._events.get()

    def __repr__(self) -> str:
        return f"<AsyncPtyHandle pid={self.pid}>"


class AsyncPty:
    """Terminals of one sandbox (`sandbox.pty`)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def create(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        cmd: str | Sequence[str] = "bash",
        on_data: OutputCallback | None = None,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> AsyncPtyHandle:
        """Starts `cmd` (default: an interactive bash; a string runs through /bin/sh -c, a sequence is argv) on a
        terminal of `cols` x `rows`, returning once it runs. on_data: called with each chunk it prints (a plain or
        an async function). envs (TERM defaults to xterm-256color), cwd, user, timeout (seconds, then killed): as
        in `commands.run`. max_output_bytes: what `wait()` keeps (default 16 MiB, 0: all). CommandNotFound when
        the program is missing."""
        process = process_config(cmd, {"TERM": DEFAULT_TERM, **(envs or {})}, cwd, user, timeout)
        process.pty = True
        process.terminal_size.CopyFrom(api.TerminalSize(cols=cols, rows=rows))
        config = api.ExecInteractiveConfig(sandbox=self._sandbox.name, process=process)
        requests: asyncio.Queue[api.ExecInteractiveRequest | None] = asyncio.Queue()
        requests.put_nowait(api.ExecInteractiveRequest(config=config))

        async def outgoing() -> Any:
            while (request := await requests.get()) is not None:
                yield request

        client = self._sandbox.client
        call = client.stub.ExecInteractive(outgoing(), metadata=client.metadata)
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise SandboxError("the terminal ended before its process started", code="UNAVAILABLE")
                event = exec_event(response.event)
                if isinstance(event, Started):
                    return AsyncPtyHandle(call, requests, event.pid, on_data, max_output_bytes)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        except BaseException:
            call.cancel()
            raise


class PtyHandle:
    """A process on a terminal, for synchronous code (see `AsyncPtyHandle`). on_data given to `create` is called
    by `wait()`, in the calling thread; iterating the handle instead yields the chunks and the exit."""

    def __init__(self, inner: AsyncPtyHandle, run: Runner, on_data: OutputCallback | None = None) -> None:
        self.aio, self._run, self._on_data = inner, run, on_data

    @property
    def pid(self) -> int:
        """The process's id in the guest."""
        return self.aio.pid

    @property
    def output(self) -> str:
        """What the terminal printed so far, decoded as UTF-8."""
        return self.aio.output

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process ended; None before."""
        return self.aio.exit_code

    def __iter__(self) -> Iterator[ExecEvent]:
        while True:
            try:
                yield self._run(self.aio.__anext__())
            except StopAsyncIteration:
                return

    def send_input(self, data: bytes | str) -> None:
        """Types `data` into the terminal."""
        self._run(self.aio.send_input(data))

    def resize(self, cols: int, rows: int) -> None:
        """Changes the terminal's size."""
        self._run(self.aio.resize(cols, rows))

    def signal(self, signal: int) -> None:
        """Sends `signal` to the process."""
        self._run(self.aio.signal(signal))

    def close_input(self) -> None:
        """Closes the terminal's input."""
        self._run(self.aio.close_input())

    def kill(self) -> bool:
        """Ends the process (SIGKILL). True when it was running."""
        return bool(self._run(self.aio.kill()))

    def wait(self, timeout: float | None = None) -> ExecResult:
        """The result once the process ends, calling on_data here with each chunk as it arrives."""
        if self._on_data is not None:
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
                if isinstance(event, Stdout):
                    self._on_data(event.data)
        result: ExecResult = self._run(self.aio.wait(timeout))
        return result

    def __repr__(self) -> str:
        return f"<PtyHandle pid={self.pid}>"


class Pty:
    """Terminals of one sandbox, for synchronous code (`Sandbox.pty`)."""

    def __init__(self, inner: AsyncPty, run: Runner) -> None:
        self.aio, self._run = inner, run

    def create(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        cmd: str | Sequence[str] = "bash",
        on_data: OutputCallback | None = None,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> PtyHandle:
        """Starts `cmd` on a terminal (see `AsyncPty.create`); on_data is called by the handle's `wait()`."""
        inner = self._run(
            self.aio.create(
                cols=cols,
                rows=rows,
                cmd=cmd,
                envs=envs,
                cwd=cwd,
                user=user,
                timeout=timeout,
                max_output_bytes=max_output_bytes,
            )
        )
        return PtyHandle(inner, self._run, on_data)


__all__ = ["AsyncPty", "AsyncPtyHandle", "Pty", "PtyHandle"]
