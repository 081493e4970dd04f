"""File streams and file operations: write and read with flow control, stat, list, make, remove.

Paths are the guest's. In host simulation (`--root`, the fake VMM of tests) they live under PATH_ROOT.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import stat as stat_module
import uuid
from typing import TYPE_CHECKING

from microvm.agent.v1 import agent_pb2
from microvm_agent.streams import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    FILE_CHUNK,
    INVALID_ARGUMENT,
    Credit,
    StreamError,
    os_error,
)

if TYPE_CHECKING:
    from microvm_agent.agent import Agent

# Host simulation (`--root DIR`, the fake VMM of tests): guest paths live under DIR on the host.
PATH_ROOT = ""
# Credit a write grants beyond the window as it starts: the next chunk travels while one is written (the host's
# relay grants a read the same; twice the window in flight, never more).
TRANSFER_AHEAD = 1 << 20


def real(path: str) -> str:
    """The host path of guest path `path` (itself inside a guest)."""
    return PATH_ROOT + path if PATH_ROOT else path


def file_info(path: str) -> agent_pb2.FileInfo:
    st = os.lstat(path)
    kind = agent_pb2.FILE_KIND_UNSPECIFIED
    if stat_module.S_ISREG(st.st_mode):
        kind = agent_pb2.FILE_KIND_FILE
    elif stat_module.S_ISDIR(st.st_mode):
        kind = agent_pb2.FILE_KIND_DIRECTORY
    elif stat_module.S_ISLNK(st.st_mode):
        kind = agent_pb2.FILE_KIND_SYMLINK
    info = agent_pb2.FileInfo(
        path=path[len(PATH_ROOT) :] or "/" if PATH_ROOT else path,
        kind=kind,
        size=st.st_size,
        mode=stat_module.S_IMODE(st.st_mode),
        modify_time_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
    )
    if kind == agent_pb2.FILE_KIND_SYMLINK:
        info.symlink_target = os.readlink(path)
    return info


def require_absolute(path: str) -> str:
    if not path.startswith("/"):
        raise StreamError(INVALID_ARGUMENT, f"path must be absolute, got {path!r}")
    if "\x00" in path:
        raise StreamError(INVALID_ARGUMENT, "path contains a NUL byte")
    return real(os.path.normpath(path))


class FileTransfer:
    """A streaming write into, or read out of, the guest's filesystem."""

    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent = agent
        self.stream_id = stream_id
        self.credit = Credit(agent.initial_window)
        self.chunks: asyncio.Queue[agent_pb2.FileData] = asyncio.Queue()

    async def write(self, start: agent_pb2.FileWriteStart) -> None:
        path = require_absolute(start.path)
        parent = os.path.dirname(path)
        try:
            if start.make_parents:
                os.makedirs(parent, exist_ok=True)
            if os.path.isdir(path):
                raise StreamError(FAILED_PRECONDITION, f"{path} is a directory")
            if start.append:
                target, fd = path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, start.mode or 0o644)
            else:
                target = os.path.join(parent, f".{os.path.basename(path)}.mvm-{uuid.uuid4().hex[:8]}")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise os_error(exc, path) from None
        digest = hashlib.sha256()
        self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=TRANSFER_AHEAD))
        try:
            while True:
                chunk = await self.chunks.get()
                if chunk.data:
                    view = memoryview(chunk.data)
                    while view:
                        view = view[os.write(fd, view) :]
                    digest.update(chunk.data)
                    self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=len(chunk.data)))
                if chunk.eof:
                    break
            os.fchmod(fd, start.mode or 0o644)
            os.close(fd)
            fd = -1
            if target != path:
                os.rename(target, path)
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if target != path and os.path.exists(target):
                os.unlink(target)
        self.agent.send(
            self.stream_id, file_write_done=agent_pb2.FileWriteDone(file=file_info(path), sha256=digest.hexdigest())
        )

    async def read(self, start: agent_pb2.FileReadStart) -> None:
        path = require_absolute(start.path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            if stat_module.S_ISDIR(os.fstat(fd).st_mode):
                raise StreamError(FAILED_PRECONDITION, f"{path} is a directory")
            if start.offset:
                try:
                    os.lseek(fd, start.offset, os.SEEK_SET)
                except (OverflowError, ValueError):
                    raise StreamError(INVALID_ARGUMENT, f"offset {start.offset} is out of range") from None
            remaining = start.length or -1
            while remaining != 0:
                allowed = await self.credit.take(FILE_CHUNK if remaining < 0 else min(FILE_CHUNK, remaining))
                data = os.read(fd, allowed)
                if len(data) < allowed:
                    self.credit.grant(allowed - len(data))
                if not data:
                    break
                if remaining > 0:
                    remaining -= len(data)
                self.agent.send(self.stream_id, file_data=agent_pb2.FileData(data=data))
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            os.close(fd)
        self.agent.send(self.stream_id, file_data=agent_pb2.FileData(eof=True))

    def handle(self, frame: agent_pb2.Frame) -> None:
        body = frame.WhichOneof("body")
        if body == "file_data":
            self.chunks.put_nowait(frame.file_data)
        elif body == "window_update":
            self.credit.grant(frame.window_update.increment)


def stat_path(request: agent_pb2.StatRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    try:
        return agent_pb2.FileResult(entries=[file_info(path)])
    except OSError as exc:
        raise os_error(exc, path) from None


def list_dir(request: agent_pb2.ListDirRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    try:
        names = sorted(os.listdir(path))
        entries = []
        for name in names:
            try:
                entries.append(file_info(os.path.join(path, name)))
            except FileNotFoundError:
                continue  # removed while listing
        return agent_pb2.FileResult(entries=entries)
    except OSError as exc:
        raise os_error(exc, path) from None


def make_dir(request: agent_pb2.MakeDirRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    if not 0 <= request.mode <= 0o7777:
        raise StreamError(INVALID_ARGUMENT, f"mode {oct(request.mode)} is not a permission mask")
    try:
        if request.parents:
            os.makedirs(path, mode=request.mode or 0o755, exist_ok=True)
        else:
            os.mkdir(path, request.mode or 0o755)
        return agent_pb2.FileResult(entries=[file_info(path)])
    except FileExistsError:
        # makedirs says "exists" when a component is a file: that is a path that cannot be a directory.
        raise StreamError(
            FAILED_PRECONDITION if request.parents else ALREADY_EXISTS,
            f"{request.path} (or a parent of it) exists and is not a directory",
        ) from None
    except OSError as exc:
        raise os_error(exc, path) from None


def remove(request: agent_pb2.RemoveRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    if path == real("/"):
        raise StreamError(INVALID_ARGUMENT, "refusing to remove /")
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            if request.recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return agent_pb2.FileResult()
    except OSError as exc:
        raise os_error(exc, path) from None


FILE_OPERATIONS = {"stat": stat_path, "list_dir": list_dir, "make_dir": make_dir, "remove": remove}


def rename(request: agent_pb2.RenameRequest) -> agent_pb2.FileResult:
    """rename(2) within one filesystem; without `overwrite` an existing destination is ALREADY_EXISTS (checked, then
    renamed with RENAME_NOREPLACE where the kernel has it, so a racing creator is not overwritten either)."""
    source, destination = require_absolute(request.source), require_absolute(request.destination)
    if real("/") in (source, destination):
        raise StreamError(INVALID_ARGUMENT, "refusing to rename / or onto /")
    if destination == source or destination.startswith(source.rstrip("/") + "/"):
        if os.path.isdir(source) and not os.path.islink(source):
            raise StreamError(INVALID_ARGUMENT, f"cannot move directory {request.source} into itself")
    try:
        os.lstat(source)
        if not request.overwrite and os.path.lexists(destination):
            raise StreamError(ALREADY_EXISTS, f"{request.destination} exists (set overwrite to replace it)")
        if request.overwrite or not _rename_noreplace(source, destination):
            os.rename(source, destination)
        return agent_pb2.FileResult(entries=[file_info(destination)])
    except OSError as exc:
        raise os_error(exc, request.source if not os.path.lexists(source) else request.destination) from None


_RENAME_NOREPLACE = 1
_libc = None


def _rename_noreplace(source: str, destination: str) -> bool:
    """renameat2(RENAME_NOREPLACE): True when done, False where the kernel or libc lacks it (the caller renames)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(_libc, "renameat2", None)
    if function is None:
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), _RENAME_NOREPLACE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(number, os.strerror(number))


FILE_OPERATIONS["rename"] = rename
