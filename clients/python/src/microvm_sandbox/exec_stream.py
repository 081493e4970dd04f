"""The events of one running process as a stream: `AsyncExecStream` (async for) and `ExecStream` (for), what
`exec_stream` returns; and the small conversions every sandbox call needs (seconds to a Duration, a command to argv)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2

from microvm_sandbox.errors import from_rpc_error
from microvm_sandbox.models import ExecEvent, Exited, exec_event
from microvm_sandbox.sync_loop import Loop


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration message of `seconds`."""
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def command_argv(command: str | Sequence[str]) -> tuple[list[str], bool]:
    """argv and whether it runs through /bin/sh -c: a string is a shell command line, a sequence is argv."""
    return ([command], True) if isinstance(command, str) else (list(command), False)


class AsyncExecStream:
    """The events of one running process: `Started`, `Stdout`/`Stderr` chunks as they are written, then
    `Exited`. Iterate it with `async for`. Stopping early (break, `aclose()`, leaving `async with`, or the
    stream being garbage-collected) cancels the call, and the server then kills the process in the guest."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self._call: Any = None
        self._responses: Any = None
        self._finished = False

    def __aiter__(self) -> AsyncExecStream:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._start()
            self._responses = self._call.__aiter__()
        try:
            while True:
                event = exec_event(await self._responses.__anext__())
                if event is not None:
                    if isinstance(event, Exited):
                        self._finished = True
                    return event
        except StopAsyncIteration:
            self._finished = True
            raise
        except grpc.aio.AioRpcError as error:
            self._finished = True
            raise from_rpc_error(error) from None

    def cancel(self) -> None:
        """Stops the stream now; the server kills the process if it still runs. Safe to call twice."""
        self._finished = True
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def aclose(self) -> None:
        """Same as `cancel()` (the name async generators use)."""
        self.cancel()

    async def __aenter__(self) -> AsyncExecStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:  # the loop may already be gone at interpreter exit
            pass


class ExecStream:
    """The events of one running process (see `AsyncExecStream`), for a plain `for` loop. Stopping early
    (break, `close()`, leaving `with`, or garbage collection) cancels the call and the server kills the process."""

    def __init__(self, inner: AsyncExecStream) -> None:
        self._inner = inner
        self._loop = Loop.shared()
        self._closed = False

    def __iter__(self) -> ExecStream:
        return self

    def __next__(self) -> ExecEvent:
        if self._closed:
            raise StopIteration
        try:
            return self._loop.run(self._inner.__anext__())
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    def close(self) -> None:
        """Stops the stream; the server kills the process if it still runs. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._loop.soon(self._inner.aclose())

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


__all__ = ["AsyncExecStream", "ExecStream", "command_argv", "duration"]
