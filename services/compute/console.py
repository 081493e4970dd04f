"""A VM's serial console: drained from its VMM into a log of bounded size, read back by tail or by range.

Where the output goes. The VMM serves the guest's serial port on a unix socket in the VM's directory
(`console.sock`: QEMU `-chardev socket,server=on,wait=off`, Cloud Hypervisor's serial mode `Socket`, the fake VMM
a stand-in that behaves like QEMU) and a ConsoleDrain in compute copies it into the VM's ConsoleLog. Why a socket
that the VMM listens on, and not the alternatives:
- a file the VMM writes can only be trimmed by compute, so it grows without bound while compute is down (a guest
  was seen writing 0.65 MB/s: 2.3 GB an hour); and QEMU opens `file:` without O_APPEND, so a file trimmed in place
  is written on at QEMU's old offset;
- a pipe read by compute breaks when compute restarts: the VMM's writes fail once the reader is gone, and a FIFO
  the VMM holds open itself fills up and stalls the guest's serial port until somebody reads;
- a socket the VMM listens on outlives compute: the next compute connects again (VmProcesses.watch, which
  adoption calls too). While nobody is connected QEMU drops what the guest writes and Cloud Hypervisor keeps the
  newest 1 MiB in memory for the next reader, so the guest is never blocked and nothing grows on disk.
So a VM's console never takes more than `max_bytes * (keep + 1)` on disk, whether compute runs or not. The price:
output written while compute is down is lost (QEMU) or cut to its last MiB (Cloud Hypervisor), and so is what a
guest writes in the moment between its VMM starting and compute connecting. While compute is connected, a guest
that writes faster than compute stores is slowed down by the socket (its own serial port waits), never compute.

Offsets. Every byte has an offset in the VM's console stream that stays the same across rotations and compute
restarts: `console.index` holds the offset of the first byte of the file with a given inode, rewritten whenever a
new `console.log` is made, so a rotation cut short by a crash is recognised by the file the index names, wherever
it was moved. Reads hold the lock only to open the files they need: rotated files never change and `console.log`
only grows, so what a read opened stays valid however the log moves on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from services.common.errors import ServiceError
from services.common.validation import check_console_read

log = structlog.get_logger()
LOG_NAME, INDEX_NAME = "console.log", "console.index"
CHUNK = 64 << 10  # bytes per read from the socket and per streamed chunk
CONNECT_SECONDS = 5.0
RECONNECT_SECONDS = (0.02, 1.0)  # first and longest pause between attempts to reach the VMM's console


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "CONSOLE_OFFSET_PAST_END"


@dataclass(frozen=True)
class Selection:
    """What a read wants: the newest `tail` bytes, or from `offset` on at most `length` bytes (0: to the end)."""

    tail: int = 0
    offset: int = 0
    length: int = 0

    def within(self, first: int, end: int) -> tuple[int, int]:
        """The bytes [start, stop) to read from a log that holds [first, end). What was rotated away is skipped:
        a read from before `first` starts at `first`."""
        if self.tail:
            return max(first, end - self.tail), end
        if self.offset > end:
            raise OutOfRange(
                f"offset {self.offset} is past the end of the console log ({end})", metadata={"end_offset": str(end)}
            )
        stop = end if not self.length else min(end, self.offset + self.length)
        return min(max(first, self.offset), stop), stop


def select(tail_bytes: int = 0, offset: int = 0, length: int = 0) -> Selection:
    """A read request's selection, INVALID_ARGUMENT when it is not one."""
    check_console_read(tail_bytes, offset, length)
    return Selection(tail_bytes, offset, length)


@dataclass
class _Piece:
    fd: int
    start: int  # offset of the file's first byte
    begin: int  # offsets to read from this file: [begin, stop)
    stop: int


class ConsoleLog:
    """One VM's console on disk: `console.log`, and the `keep` files before it, `console.log.1` (the newest) to
    `console.log.<keep>`; each at most `max_bytes`. One writer (the drain) and any number of readers, in threads."""

    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        self.directory, self.max_bytes, self.keep = directory, max_bytes, keep
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0  # of console.log while it is open for writing
        self._start: int | None = None  # offset of console.log's first byte, once known
        self._closed = False

    def _file(self, number: int = 0) -> Path:
        return self.directory / (f"{LOG_NAME}.{number}" if number else LOG_NAME)

    def _numbered(self) -> list[int]:
        """Numbers of the rotated files present, oldest first."""
        numbers = [p.name[len(LOG_NAME) + 1 :] for p in self.directory.glob(f"{LOG_NAME}.*")]
        return sorted((int(n) for n in numbers if n.isdigit()), reverse=True)

    # --- writing -------------------------------------------------------------------------------------------
    def append(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view and not self._closed:
                if self._fd is None:
                    self._open()
                room = self.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    continue
                written = os.write(self._fd, view[:room])
                self._size += written
                view = view[written:]

    def _open(self) -> None:
        self._load()
        self._fd = os.open(self._file(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        stat = os.fstat(self._fd)
        self._size = stat.st_size
        if self._index() != (stat.st_ino, self._start):
            temporary = self.directory / f"{INDEX_NAME}.new"
            temporary.write_text(json.dumps({"inode": stat.st_ino, "start": self._start}))
            os.replace(temporary, self.directory / INDEX_NAME)

    def _rotate(self) -> None:
        """console.log becomes console.log.1 and the older files move up one; the oldest goes first, so the disk
        never holds more than `keep + 1` full files. A crash at any step leaves the file the index names in place
        or renamed, never deleted, so offsets are recovered."""
        os.close(self._fd)
        self._fd = None
        if self.keep:
            self._file(self.keep).unlink(missing_ok=True)
        for number in range(self.keep - 1, 0, -1):
            if self._file(number).exists():
                os.replace(self._file(number), self._file(number + 1))
        os.replace(self._file(), self._file(1))
        self._start += self._size
        self._open()
        if not self.keep:
            self._file(1).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # --- offsets -------------------------------------------------------------------------------------------
    def _index(self) -> tuple[int, int] | None:
        try:
            index = json.loads((self.directory / INDEX_NAME).read_text())
            return int(index["inode"]), int(index["start"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load(self) -> None:
        """Finds the offset of console.log's first byte, once: from the index, anchored on the file it names
        (the offset of the oldest file kept is 0 when there is no usable index). Files beyond `keep` go."""
        if self._start is not None:
            return
        order = self._numbered() + ([0] if self._file().exists() else [])
        stats = {number: self._file(number).stat() for number in order}
        relative, position = {}, 0
        for number in order:
            relative[number] = position
            position += stats[number].st_size
        base, index = 0, self._index()
        for number in order if index else ():
            if stats[number].st_ino == index[0]:
                base = max(0, index[1] - relative[number])
        self._start = base + relative.get(0, position)
        for number in order:
            if number > self.keep:
                self._file(number).unlink(missing_ok=True)

    def window(self) -> tuple[int, int]:
        """Offsets [first, end) of the bytes kept."""
        with self._lock:
            first, end, _ = self._parts()
            return first, end

    def _parts(self) -> tuple[int, int, list[tuple[Path, int, int]]]:
        """(first, end, [(file, offset of its first byte, size)] oldest first). Called holding the lock."""
        self._load()
        try:
            current = self._size if self._fd is not None else self._file().stat().st_size
        except FileNotFoundError:
            current = 0
        parts = [(self._file(), self._start, current)] if current else []
        first = self._start
        for number in range(1, self.keep + 1):
            try:
                size = self._file(number).stat().st_size
            except FileNotFoundError:
                continue
            first -= size
            parts.insert(0, (self._file(number), first, size))
        return first, self._start + current, parts

    # --- reading -------------------------------------------------------------------------------------------
    def _open_pieces(self, selection: Selection) -> list[_Piece]:
        with self._lock:
            first, end, parts = self._parts()
            begin, stop = selection.within(first, end)
            pieces = []
            try:
                for path, start, size in parts:
                    if start < stop and begin < start + size:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        pieces.append(_Piece(fd, start, max(begin, start), min(stop, start + size)))
            except BaseException:
                for piece in pieces:
                    os.close(piece.fd)
                raise
            return pieces

    async def stream(self, selection: Selection) -> AsyncIterator[tuple[int, bytes]]:
        """(offset, bytes) chunks of at most CHUNK bytes, following each other, of what `selection` names."""
        pieces = await asyncio.to_thread(self._open_pieces, selection)
        try:
            for piece in pieces:
                position = piece.begin
                while position < piece.stop:
                    count = min(CHUNK, piece.stop - position)
                    data = await asyncio.to_thread(os.pread, piece.fd, count, position - piece.start)
                    if not data:
                        break
                    yield position, data
                    position += len(data)
        finally:
            for piece in pieces:
                os.close(piece.fd)

    def tail(self, count: int) -> bytes:
        """The newest `count` bytes (a small read: for messages)."""
        pieces = self._open_pieces(Selection(tail=count))
        try:
            return b"".join(os.pread(p.fd, p.stop - p.begin, p.begin - p.start) for p in pieces)
        finally:
            for piece in pieces:
                os.close(piece.fd)


class ConsoleDrain:
    """Copies one VM's console socket into its ConsoleLog for as long as its VMM lives, connecting again whenever
    the connection ends (the VMM restarted its listener, or this is a new compute instance adopting the VM)."""

    def __init__(self, socket_path: Path, console: ConsoleLog, alive: Callable[[], bool]) -> None:
        self.socket_path, self.console, self.alive = socket_path, console, alive
        self._write_failed = False

    async def run(self) -> None:
        """Returns once the VMM is gone and what it wrote is stored (its socket ended and it does not run)."""
        pause = RECONNECT_SECONDS[0]
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.socket_path)), CONNECT_SECONDS
                )
            except (OSError, TimeoutError):
                if not self.alive():
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_SECONDS[1])
                continue
            try:
                # No deadline: a quiet console is normal; the read lasts as long as the VM, which ends it.
                while data := await reader.read(CHUNK):
                    pause = RECONNECT_SECONDS[0]
                    await self._store(data)
            except OSError:
                pass
            finally:
                writer.close()
            if not self.alive():
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_SECONDS[1])

    async def _store(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.console.append, data)
        except OSError as exc:  # a full disk: the output is dropped, the guest is never held up
            if not self._write_failed:
                log.warning("console_log_write_failed", path=str(self.console.directory), error=str(exc))
            self._write_failed = True
        else:
            self._write_failed = False
