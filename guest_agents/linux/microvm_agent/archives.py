"""Directories as tar streams: extract an archive the host streams in, and stream a path out as an archive.

tarfile runs in a worker thread in its streaming modes (`r|*`, `w|`) over a pipe to the event loop, so neither
direction ever holds more than the pipe and one flow-control window. An uploaded archive is hostile until proven
otherwise: every member is checked before anything is written (`safe_parts`), parent directories are walked one
component at a time refusing symbolic links (nothing is ever written through a link, wherever it points), and only
files, directories and links are made (no device nodes, no fifos). A refusal is INVALID_ARGUMENT with reason
UNSAFE_ARCHIVE_MEMBER; the members before it stay extracted.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import stat as stat_module
import tarfile
from typing import TYPE_CHECKING, BinaryIO

from microvm.agent.v1 import agent_pb2
from microvm_agent.files import TRANSFER_AHEAD, require_absolute
from microvm_agent.streams import (
    F_SETPIPE_SZ,
    FAILED_PRECONDITION,
    FILE_CHUNK,
    INVALID_ARGUMENT,
    PIPE_BYTES,
    Credit,
    StreamError,
    os_error,
    read_some,
    writev_fd,
)

if TYPE_CHECKING:
    from microvm_agent.agent import Agent

MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
TAR_BUFFER = 1 << 20
UNSAFE = "UNSAFE_ARCHIVE_MEMBER"


def unsafe(name: str, why: str) -> StreamError:
    return StreamError(INVALID_ARGUMENT, f"archive member {name[:200]!r}: {why}", UNSAFE)


def safe_parts(name: str) -> list[str]:
    """The path components of member `name` below the target; refuses absolute names, `..` and oversize names."""
    if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
        raise unsafe(name, f"name longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise unsafe(name, "absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    for part in parts:
        if part == "..":
            raise unsafe(name, "`..` in its name")
        if len(part.encode(errors="surrogateescape")) > MAX_COMPONENT_BYTES:
            raise unsafe(name, f"a name component longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # the default size works, a little slower
    return read_end, write_end


class Extractor:
    """Writes the members of one archive under `root` (a host path), safely; counts what it made."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.entries = 0
        self.bytes = 0

    def directory_of(self, name: str, parts: list[str]) -> str:
        """The parent directory of a member, made as needed, reached without following any symbolic link."""
        current = self.root
        for part in parts[:-1]:
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if stat_module.S_ISLNK(st.st_mode):
                raise unsafe(name, f"would be written through the symbolic link {part!r}")
            if not stat_module.S_ISDIR(st.st_mode):
                raise StreamError(FAILED_PRECONDITION, f"archive member {name[:200]!r}: {part!r} is not a directory")
        return current

    def clear(self, path: str, for_directory: bool) -> None:
        """Makes room at `path`: a file or link there goes; a directory stays for a directory, else refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat_module.S_ISDIR(st.st_mode):
            if not for_directory:
                raise StreamError(FAILED_PRECONDITION, f"{path} is a directory")
            return
        os.unlink(path)

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = safe_parts(member.name)
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            raise unsafe(member.name, "not a file, directory or link (device nodes and fifos are refused)")
        if not parts:
            if member.isdir():
                return  # the target itself
            raise unsafe(member.name, "a file named like the target directory")
        parent = self.directory_of(member.name, parts)
        path = os.path.join(parent, parts[-1])
        mode = member.mode & 0o7777
        try:
            self.clear(path, member.isdir())
            if member.isdir():
                if not os.path.isdir(path):
                    os.mkdir(path, 0o700)
                os.chmod(path, mode or 0o755)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                target_parts = safe_parts(member.linkname)
                if not target_parts:
                    raise unsafe(member.name, "a hard link to the target directory")
                target = os.path.join(self.directory_of(member.name, target_parts), target_parts[-1])
                os.link(target, path, follow_symlinks=False)
            else:
                self.write(tar, member, path, mode)
            if not member.isdir():
                mtime_ns = int(member.mtime * 10**9)  # pax times may be fractional
                os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        except OSError as exc:
            raise os_error(exc, path) from None
        self.entries += 1

    def write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, mode: int) -> None:
        source = tar.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while data := source.read(TAR_BUFFER):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                self.bytes += len(data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def run(self, source: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=source, mode="r|*", bufsize=TAR_BUFFER) as tar:
                for member in tar:
                    self.member(tar, member)
            while source.read(TAR_BUFFER):
                pass  # padding after the end-of-archive blocks: taken, so the sender finishes
        except (tarfile.TarError, EOFError) as exc:
            raise StreamError(INVALID_ARGUMENT, f"not a valid tar archive: {exc}", "INVALID_ARCHIVE") from None


class ArchiveExtraction:
    """archive_extract_start: FileData frames (within the window this stream grants) piped into an Extractor."""

    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id
        self.chunks: asyncio.Queue[agent_pb2.FileData] = asyncio.Queue()

    def handle(self, frame: agent_pb2.Frame) -> None:
        if frame.WhichOneof("body") == "file_data":
            self.chunks.put_nowait(frame.file_data)

    async def run(self, start: agent_pb2.ArchiveExtractStart) -> None:
        root = require_absolute(start.path)
        try:
            os.makedirs(root, 0o755, exist_ok=True)
        except FileExistsError:
            raise StreamError(FAILED_PRECONDITION, f"{start.path} is not a directory") from None
        except OSError as exc:
            raise os_error(exc, start.path) from None
        extractor, digest = Extractor(root), hashlib.sha256()
        read_end, write_end = _pipe()
        os.set_blocking(write_end, False)
        source = os.fdopen(read_end, "rb", buffering=0)
        worker = asyncio.ensure_future(asyncio.to_thread(self._extract, extractor, source))

        async def pump() -> None:
            while True:
                chunk = await self.chunks.get()
                if chunk.data:
                    await writev_fd(write_end, [chunk.data])
                    digest.update(chunk.data)
                    self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=len(chunk.data)))
                if chunk.eof:
                    return

        pumping = asyncio.ensure_future(pump())
        self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=TRANSFER_AHEAD))
        try:
            await asyncio.wait([worker, pumping], return_when=asyncio.FIRST_COMPLETED)
            if pumping.done():
                pumping.result()
                os.close(write_end)
                write_end = -1
            await worker  # raises what the extraction met
        except BrokenPipeError:
            await worker  # the extractor stopped reading: its error says why
            raise
        finally:
            pumping.cancel()
            if write_end >= 0:
                os.close(write_end)  # the extractor, if still reading, sees the end and stops
        self.agent.send(
            self.stream_id,
            archive_extracted=agent_pb2.ArchiveExtracted(
                entries=extractor.entries, bytes=extractor.bytes, sha256=digest.hexdigest()
            ),
        )

    @staticmethod
    def _extract(extractor: Extractor, source: BinaryIO) -> None:
        with source:
            extractor.run(source)


class ArchiveCreation:
    """archive_create_start: a path written as a tar stream by a worker thread, sent as FileData within credit."""

    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id
        self.credit = Credit(agent.initial_window)

    def handle(self, frame: agent_pb2.Frame) -> None:
        if frame.WhichOneof("body") == "window_update":
            self.credit.grant(frame.window_update.increment)

    async def run(self, start: agent_pb2.ArchiveCreateStart) -> None:
        path = require_absolute(start.path)
        try:
            os.lstat(path)
        except OSError as exc:
            raise os_error(exc, start.path) from None
        name = os.path.basename(os.path.normpath(start.path))
        read_end, write_end = _pipe()
        os.set_blocking(read_end, False)
        sink = os.fdopen(write_end, "wb", buffering=0)
        worker = asyncio.ensure_future(asyncio.to_thread(self._create, path, name, sink))
        try:
            while True:
                allowed = await self.credit.take(FILE_CHUNK)
                data = await read_some(read_end, allowed)
                if len(data) < allowed:
                    self.credit.grant(allowed - len(data))
                if not data:
                    break
                self.agent.send(self.stream_id, file_data=agent_pb2.FileData(data=data))
            await worker
        finally:
            os.close(read_end)  # a worker still writing gets EPIPE and stops
            if not worker.done():
                await asyncio.wait([worker])
        self.agent.send(self.stream_id, file_data=agent_pb2.FileData(eof=True))

    @staticmethod
    def _create(path: str, name: str, sink: BinaryIO) -> None:
        def skip_special(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return info if (info.isdir() or info.isreg() or info.issym() or info.islnk()) else None

        try:
            with sink, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=TAR_BUFFER) as tar:
                tar.copybufsize = TAR_BUFFER
                if name:
                    tar.add(path, arcname=name, filter=skip_special)
                else:  # the root: its entries, by their own names
                    for entry in sorted(os.listdir(path)):
                        tar.add(os.path.join(path, entry), arcname=entry, filter=skip_special)
        except BrokenPipeError:
            pass  # the stream was cancelled
        except OSError as exc:
            raise os_error(exc, exc.filename or path) from None


FILE_STREAMS = {"archive_extract_start": ArchiveExtraction, "archive_create_start": ArchiveCreation}
