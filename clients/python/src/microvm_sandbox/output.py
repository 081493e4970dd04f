"""What a collecting call keeps of a process's output (`OutputCollector`: at most `max_output_bytes`, and whether it
dropped some), the events that wait for an iterator (`EventBuffer`), and output callbacks. Shared by
`microvm_sandbox.commands` and `microvm_sandbox.terminal`; nothing here talks to the server."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from microvm_sandbox.errors import SandboxError
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecEvent, ExecResult, Exited, Stderr, Stdout

OutputCallback = Callable[[bytes], object]
Runner = Callable[[Awaitable[Any]], Any]  # runs a coroutine on the sync SDK's loop and returns its result


class OutputCollector:
    """What a collecting call keeps of a process's output: stdout and stderr up to `max_output_bytes` together
    (0: all), and how much came."""

    def __init__(self, max_output_bytes: int = MAX_OUTPUT_BYTES) -> None:
        self.limit = max_output_bytes
        self.stdout, self.stderr = bytearray(), bytearray()
        self.received = 0
        self.dropped = False

    def add(self, event: Stdout | Stderr) -> None:
        """Keeps what fits of one chunk."""
        self.received += len(event.data)
        kept = len(self.stdout) + len(self.stderr)
        room = len(event.data) if not self.limit else max(0, self.limit - kept)
        if room < len(event.data):
            self.dropped = True
        (self.stdout if isinstance(event, Stdout) else self.stderr).extend(event.data[:room])

    def result(self, exited: Exited, output_bytes: int = 0) -> ExecResult:
        """The result once the process ended; `output_bytes`: what it wrote in all, when known."""
        total = max(output_bytes, exited.output_bytes, self.received)
        return ExecResult(
            bytes(self.stdout),
            bytes(self.stderr),
            exited.exit_code,
            exited.signal,
            exited.timed_out,
            truncated=self.dropped or exited.truncated or total > self.received,
            output_bytes=total,
        )


async def deliver(callback: OutputCallback | None, data: bytes) -> None:
    """Calls an output callback, a plain or an async function."""
    if callback is not None:
        result = callback(data)
        if inspect.isawaitable(result):
            await result


class EventBuffer:
    """Events waiting for an iterator, at most `limit` bytes of output (0: no limit): beyond that the oldest output
    goes. `None` ends the iteration; an exception is raised to the iterator."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: asyncio.Queue[ExecEvent | BaseException | None] = asyncio.Queue()
        self.size = 0

    def put(self, item: ExecEvent | BaseException | None) -> None:
        if isinstance(item, (Stdout, Stderr)):
            self.size += len(item.data)
            while self.limit and self.size > self.limit and not self.items.empty():
                oldest = self.items.get_nowait()
                if isinstance(oldest, (Stdout, Stderr)):
                    self.size -= len(oldest.data)
                elif oldest is not None:  # an end stays
                    self.items.put_nowait(oldest)
                    break
        self.items.put_nowait(item)

    async def get(self) -> ExecEvent:
        item = await self.items.get()
        if item is None or isinstance(item, BaseException):
            self.items.put_nowait(item)  # every later call ends the same way
            if item is None:
                raise StopAsyncIteration
            raise item
        if isinstance(item, (Stdout, Stderr)):
            self.size -= len(item.data)
        return item


def collect(
    events: Any,
    run: Runner,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> ExecResult:
    """Reads an AsyncExecStream from synchronous code to its end, calling the callbacks in this thread."""
    output = OutputCollector(max_output_bytes)
    try:
        while True:
            try:
                event = run(events.__anext__())
            except StopAsyncIteration:
                break
            if isinstance(event, (Stdout, Stderr)):
                output.add(event)
                callback = on_stdout if isinstance(event, Stdout) else on_stderr
                if callback is not None:
                    callback(event.data)
            elif isinstance(event, Exited):
                return output.result(event)
    finally:
        events.cancel()
    raise SandboxError("the process stream ended without an exit status", code="UNAVAILABLE")
