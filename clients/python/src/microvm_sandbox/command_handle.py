"""`AsyncCommandHandle`: a background process being followed (what `commands.run(..., background=True)` and
`commands.connect(pid)` return); its output is collected, buffered for iterators and given to callbacks as it comes.
"""

from __future__ import annotations

import asyncio
import builtins
from typing import TYPE_CHECKING

import grpc

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import FailedPreconditionError, SandboxError, TimeoutError, from_rpc_error
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecEvent, ExecResult, Exited, Started, Stdout, exec_event
from microvm_sandbox.output import EventBuffer, OutputCallback, OutputCollector, deliver

if TYPE_CHECKING:
    from microvm_sandbox.commands import AsyncCommands, ProcessInfo


class AsyncCommandHandle:
    """A background process being followed: `pid`, `tag`; `wait()` for its result; `kill()`, `signal()`,
    `send_stdin()`, `close_stdin()`; `async for event in handle` yields its `Stdout`/`Stderr` chunks and its
    `Exited` as they come (at most `max_output_bytes` of output waits for the iterator: beyond that the oldest
    goes). on_stdout/on_stderr are called with each chunk as it arrives, whether or not anyone waits.
    `disconnect()` stops following; the process runs on (`commands.connect(pid)` follows it again)."""

    def __init__(
        self,
        commands: AsyncCommands,
        pid: int,
        tag: str = "",
        *,
        tail_bytes: int = 0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> None:
        self.pid, self.tag = pid, tag
        self._commands = commands
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self._output = OutputCollector(max_output_bytes)
        self._events = EventBuffer(max_output_bytes)
        self._result: ExecResult | None = None
        self._error: BaseException | None = None
        self._disconnected = False
        request = api.ConnectProcessRequest(sandbox=commands.sandbox_name, pid=pid, tail_bytes=tail_bytes)
        client = commands.client
        self._call = client.stub.ConnectProcess(request, metadata=client.metadata)
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        try:
            exited = None
            async for response in self._call:
                event = exec_event(response.event)
                if event is None or isinstance(event, Started):
                    continue
                if isinstance(event, Exited):
                    exited = event
                    break
                self._output.add(event)
                await deliver(self._on_stdout if isinstance(event, Stdout) else self._on_stderr, event.data)
                self._events.put(event)
            if exited is None:
                raise SandboxError("the process stream ended without an exit status", code="UNAVAILABLE")
            self._result = self._output.result(exited, await self._commands._written(self.pid))
            self._events.put(exited)
            self._events.put(None)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            if not self._disconnected:
                if isinstance(error, asyncio.CancelledError):
                    raise
                self._error = from_rpc_error(error)
                self._events.put(self._error)
                return
            self._error = FailedPreconditionError(
                f"stopped following process {self.pid} (it runs on): commands.connect({self.pid}) follows it again",
                code="FAILED_PRECONDITION",
            )
            self._events.put(None)
        except BaseException as error:  # a callback failed, or the SDK was cancelled
            self._error = error
            self._call.cancel()
            self._events.put(error if isinstance(error, Exception) else None)
            if not isinstance(error, Exception):
                raise

    @property
    def stdout(self) -> str:
        """Standard output so far (what `wait()` keeps), decoded as UTF-8."""
        return self._output.stdout.decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Standard error so far (what `wait()` keeps), decoded as UTF-8."""
        return self._output.stderr.decode(errors="replace")

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process has ended and its end arrived here; None before (or when a signal
        ended it)."""
        return self._result.exit_code if self._result is not None else None

    @property
    def finished(self) -> bool:
        """The process's end arrived here (or following failed)."""
        return self._task.done()

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """The result once the process ends: output (at most `max_output_bytes`: `truncated` says when more
        came, or when output was written before following began), exit status. A non-zero exit is a result, not an
        error. timeout: seconds to wait at most (TimeoutError; the process runs on)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except builtins.TimeoutError:
            raise TimeoutError(f"process {self.pid} still runs after {timeout:g} s", code="DEADLINE_EXCEEDED") from None
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def kill(self) -> bool:
        """Kills the process (SIGKILL). True when it was running, False when it had already ended."""
        return await self._commands.kill(self.pid)

    async def signal(self, signal: int) -> ProcessInfo:
        """Sends `signal` (1..64, e.g. 15 asks it to end, 2 is Ctrl-C) to the process; returns it as it is then."""
        return await self._commands.signal(self.pid, signal)

    async def send_stdin(self, data: bytes | str) -> None:
        """Writes `data` (str: UTF-8) to its stdin (it must have been started with stdin=True)."""
        await self._commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        """Closes its stdin (end of input)."""
        await self._commands.close_stdin(self.pid)

    async def disconnect(self) -> None:
        """Stops following; the process runs on. `wait()` then raises FailedPreconditionError."""
        self._disconnected = True
        self._call.cancel()
        await asyncio.wait([self._task])

    def __aiter__(self) -> AsyncCommandHandle:
        return self

    async def __anext__(self) -> ExecEvent:
        return await self._events.get()

    def __repr__(self) -> str:
        return f"<AsyncCommandHandle pid={self.pid} tag={self.tag!r}>"


__all__ = ["AsyncCommandHandle"]
