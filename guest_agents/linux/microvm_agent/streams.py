"""Pieces every stream of the agent shares: statuses, credit (flow control), and non-blocking fd I/O."""

from __future__ import annotations

import asyncio
import errno
import os

PROTOCOL_VERSION = 1
INITIAL_WINDOW = 1 << 20
OUTPUT_CHUNK = 1 << 20
FILE_CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# How long output may keep arriving after the process exited (a background child holding the pipe
# must not hold the exit event hostage).
DRAIN_AFTER_EXIT_SECONDS = 0.5

# google.rpc.Code numbers.
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED = 3, 5, 6, 7
FAILED_PRECONDITION, INTERNAL, CANCELLED = 9, 13, 1
RESOURCE_EXHAUSTED, OUT_OF_RANGE = 8, 11
MAX_TERMINAL = 65535


class StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def os_error(exc: OSError, path: str) -> StreamError:
    code = {
        errno.ENOENT: NOT_FOUND,
        errno.EEXIST: ALREADY_EXISTS,
        errno.EACCES: PERMISSION_DENIED,
        errno.EPERM: PERMISSION_DENIED,
        errno.EISDIR: FAILED_PRECONDITION,
        errno.ENOTDIR: FAILED_PRECONDITION,
        errno.ENOTEMPTY: FAILED_PRECONDITION,
        errno.ENAMETOOLONG: INVALID_ARGUMENT,
        errno.EINVAL: INVALID_ARGUMENT,
        errno.ELOOP: FAILED_PRECONDITION,
        errno.EROFS: FAILED_PRECONDITION,
        errno.EBUSY: FAILED_PRECONDITION,
        errno.EXDEV: FAILED_PRECONDITION,
        errno.ETXTBSY: FAILED_PRECONDITION,
        errno.ENOSPC: RESOURCE_EXHAUSTED,
        errno.EDQUOT: RESOURCE_EXHAUSTED,
        errno.EMFILE: RESOURCE_EXHAUSTED,
        errno.ENFILE: RESOURCE_EXHAUSTED,
        errno.EFBIG: OUT_OF_RANGE,
    }.get(exc.errno, INTERNAL)
    return StreamError(code, f"{path}: {exc.strerror or exc}")


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


async def write_fd(fd: int, data: bytes) -> None:
    await writev_fd(fd, [data])


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
