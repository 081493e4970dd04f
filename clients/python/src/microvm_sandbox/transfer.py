"""Streaming pieces of the file API: byte sources cut into chunks, and tar archives made or unpacked by a worker
thread while the bytes flow, handed over through a bounded queue, so a transfer never holds more than a few chunks
whatever its size (the SDK's files stay under 64 MiB of memory for a 1 GiB file)."""

from __future__ import annotations

import asyncio
import ctypes
import io
import os
import queue
import tarfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from microvm_sandbox.errors import InvalidArgumentError

CHUNK = 1 << 20
QUEUED_CHUNKS = 4
_END = b""

# The gRPC channel's receive window: fixed (no BDP probing), so a download holds at most this much in the client.
CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 2 << 20)]
M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator() -> None:
    """Chunk buffers (1 MiB) go back to the system when freed: glibc's mmap threshold fixed at 256 KiB instead of
    growing to the chunk size, which lets freed chunks pile up in the heap (RSS grew ~20 MiB per GiB moved)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 256 << 10)
    except (OSError, AttributeError):
        pass  # not glibc: its own allocator's behaviour


Data = bytes | bytearray | memoryview | str | BinaryIO | Iterable[bytes] | AsyncIterable[bytes]


async def chunks_of(data: Data) -> AsyncIterator[bytes]:
    """`data` as chunks of at most 1 MiB: bytes (str as UTF-8), a binary file object (read in a thread), or an
    iterable or async iterable of bytes."""
    tune_allocator()
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            yield bytes(view[offset : offset + CHUNK])
        return
    if hasattr(data, "read"):
        while block := await asyncio.to_thread(data.read, CHUNK):
            yield block
        return
    if isinstance(data, AsyncIterable):
        async for block in data:
            for offset in range(0, len(block), CHUNK):
                yield bytes(block[offset : offset + CHUNK])
        return
    if isinstance(data, Iterable):
        for block in data:
            for offset in range(0, len(block), CHUNK):
                yield bytes(block[offset : offset + CHUNK])
        return
    raise InvalidArgumentError(f"cannot write a {type(data).__name__}: give bytes, str, a binary file or chunks")


class Stopped(Exception):
    """The other side of a hand-over gave up (its call failed or was cancelled)."""


class _Handover:
    """Chunks between a worker thread and the event loop through a queue of at most QUEUED_CHUNKS."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.stopped = threading.Event()

    def put(self, chunk: bytes) -> None:
        """Blocking (a thread): waits for room unless the other side stopped."""
        while not self.stopped.is_set():
            try:
                self.queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue
        raise Stopped()

    def get(self) -> bytes:
        while not self.stopped.is_set():
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
        raise Stopped()

    def stop(self) -> None:
        self.stopped.set()


class _Writer(io.RawIOBase):
    """The file object tarfile writes to in the worker: 1 MiB chunks into the hand-over."""

    def __init__(self, handover: _Handover) -> None:
        self.handover, self.buffer = handover, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self.handover.put(bytes(self.buffer[:CHUNK]))
            del self.buffer[:CHUNK]
        return len(data)

    def finish(self) -> None:
        if self.buffer:
            self.handover.put(bytes(self.buffer))
        self.handover.put(_END)


class _Reader(io.RawIOBase):
    """The file object tarfile reads from in the worker: the chunks the event loop hands over."""

    def __init__(self, handover: _Handover) -> None:
        self.handover, self.pending, self.ended = handover, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        if not self.pending and not self.ended:
            self.pending = self.handover.get()
            self.ended = not self.pending
        size = min(len(target), len(self.pending))
        target[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


async def tar_chunks(fill: Callable[[tarfile.TarFile], None]) -> AsyncIterator[bytes]:
    """A tar archive as it is made: `fill(tar)` adds members in a worker thread, the chunks come out here."""
    tune_allocator()
    handover = _Handover()

    def make() -> None:
        sink = _Writer(handover)
        try:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
                fill(tar)
            sink.finish()
        except Stopped:
            pass

    worker = asyncio.ensure_future(asyncio.to_thread(make))
    try:
        while True:
            getting = asyncio.ensure_future(asyncio.to_thread(handover.get))
            await asyncio.wait([getting, worker], return_when=asyncio.FIRST_COMPLETED)
            if not getting.done() and worker.exception() is not None:  # the worker failed: say why
                handover.stop()
                await worker
            chunk = await getting
            if chunk == _END:
                break
            yield chunk
        await worker
    finally:
        handover.stop()
        await asyncio.wait([worker])


def add_path(tar: tarfile.TarFile, local: Path, arcname: str) -> None:
    """`local` (a file or a whole directory) into `tar` under `arcname`; links stay links, sockets are left out."""
    tar.add(str(local), arcname=arcname, filter=lambda info: None if info.type not in tarfile.SUPPORTED_TYPES else info)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


async def untar_into(chunks: AsyncIterator[bytes], target: Path, strip: int = 0) -> None:
    """Unpacks the tar archive arriving as `chunks` under `target`, safely (tarfile's `data` filter: no absolute
    names, no `..`, no links out, no devices), dropping the first `strip` components of each name."""
    tune_allocator()
    if not hasattr(tarfile, "data_filter"):
        raise InvalidArgumentError("unpacking directories needs Python 3.11.4 or later (tarfile extraction filters)")
    handover = _Handover()

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        parts = [p for p in member.name.split("/") if p not in ("", ".")][strip:]
        if not parts:
            return None
        member = member.replace(name="/".join(parts), deep=False)
        if member.islnk():
            link = [p for p in member.linkname.split("/") if p not in ("", ".")][strip:]
            member = member.replace(linkname="/".join(link), deep=False)
        return tarfile.data_filter(member, path)

    def unpack() -> None:
        source = _Reader(handover)
        try:
            with tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK) as tar:
                tar.extractall(target, filter=keep)
            while source.read(CHUNK):
                pass
        except Stopped:
            pass

    os.makedirs(target, exist_ok=True)
    worker = asyncio.ensure_future(asyncio.to_thread(unpack))
    try:
        async for chunk in chunks:
            putting = asyncio.ensure_future(asyncio.to_thread(handover.put, chunk))
            await asyncio.wait([putting, worker], return_when=asyncio.FIRST_COMPLETED)
            if not putting.done() and worker.exception() is not None:
                handover.stop()
                await worker  # raises what stopped it
            await putting
        await asyncio.to_thread(handover.put, _END)
        await worker
    finally:
        handover.stop()
        await asyncio.wait([worker])


REFUSED_KEY = "mvm-refused"


async def send_until_refused(start: Callable[[AsyncIterator[Any]], Any], messages: AsyncIterator[Any]) -> Any:
    """The reply of the client-streaming call `start(requests)`, sending `messages` until they end or the server says
    in its initial metadata (`mvm-refused`) that it refused the call: then the stream is half-closed at once and the
    server's status arrives with no write in flight (grpc's asyncio client would report INTERNAL instead,
    grpc/grpc#36066), and no more of a doomed upload is sent."""
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        async for message in messages:
            if stop.is_set():
                return
            yield message

    call = start(requests())

    async def watch() -> None:
        try:
            metadata = await call.initial_metadata()
        except Exception:
            return
        if any(key == REFUSED_KEY for key, _ in (metadata or ())):
            stop.set()

    watcher = asyncio.ensure_future(watch())
    try:
        return await call
    finally:
        watcher.cancel()
