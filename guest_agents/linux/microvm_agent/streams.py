"""Pieces every stream of the agent shares: statuses, credit (flow control), and non-blocking fd I/O."""

from __future__ import annotations

import asyncio
import errno
import os

# Statuses and the errno table live in errnos.py; re-exported here for the streams that import them from here.
from microvm_agent.errnos import (
    ALREADY_EXISTS,
    CANCELLED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OUT_OF_RANGE,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    StreamError,
    os_error,
)

PROTOCOL_VERSION = 1
INITIAL_WINDOW = 1 << 20
OUTPUT_CHUNK = 1 << 20
FILE_CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PIPE_BYTES = 1 << 20
FULL_PIPE_BYTES = 1 << 16  # what a pipe holds before it grows (Linux's default)
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# How long output may keep arriving after the process exited (a background child holding the pipe
# must not hold the exit event hostage).
DRAIN_AFTER_EXIT_SECONDS = 0.5

MAX_TERMINAL = 65535

__all__ = [
    "ALREADY_EXISTS",
    "CANCELLED",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "OUT_OF_RANGE",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "StreamError",
    "os_error",
]


class Credit:
    """Bytes a stream may still send; waiters resume when the host grants more."""

    def __init__(self, initial: int) -> None:
        self.available = initial
        self._granted = asyncio.Event()

    def grant(self, amount: int) -> None:
        self.available += amount
        self._granted.set()

    async def take(self, wanted: int) -> int:
        while self.available <= 0:
            self._granted.clear()
            await self._granted.wait()
        amount = min(wanted, self.available)
        self.available -= amount
        return amount


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def read_fd(fd: int, size: int) -> bytes:
    """Reads once from a non-blocking fd; b'' at end of file (EIO from a pty master counts as EOF)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def read_waiting(fd: int, size: int) -> bytes | None:
    """Up to `size` bytes that a non-blocking fd holds now: None when it holds none yet, b'' at its end (EIO from a
    pty master counts as the end)."""
    parts, total = [], 0
    while total < size:
        try:
            more = os.read(fd, size - total)
        except BlockingIOError:
            break
        except OSError as exc:
            if parts:  # the next read reports it
                break
            if exc.errno == errno.EIO:
                return b""
            raise
        if not more:
            if parts:  # the end: the next read reports it
                break
            return b""
        parts.append(more)
        total += len(more)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_some(fd: int, size: int) -> bytes:
    """Up to `size` bytes from a non-blocking fd: waits for the first, then takes what is there without waiting."""
    while True:
        data = read_waiting(fd, size)
        if data is not None:
            return data
        await wait_readable(fd)


async def write_fd(fd: int, data: bytes) -> None:
    await writev_fd(fd, [data])


def unwritten(buffers, written: int) -> list:
    """What of `buffers` a write of `written` bytes left, without copying."""
    rest = []
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
        else:
            rest.append(memoryview(buffer)[written:] if written else buffer)
            written = 0
    return rest


async def writev_fd(fd: int, buffers: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    views = [memoryview(b) for b in buffers if b]
    while views:
        try:
            written = os.writev(fd, views[:512])
            while written and views:
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0
            continue
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_writer(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_writer(fd)
