"""A sandbox's filesystem, E2B-style: `sandbox.files.read/write/list/...` (async: `AsyncFiles`, sync: `Files`).

    async with AsyncSandbox.create() as sb:
        await sb.files.write("/root/app/main.py", "print(42)")
        await sb.files.write_many({"/root/app/a.txt": "a", "/root/app/b.bin": b"\\0"})
        for entry in await sb.files.list("/root/app"):
            print(entry.name, entry.type, entry.size)
        await sb.files.upload("./project", "/root/project")        # a directory: one tar stream
        async with sb.files.watch_dir("/root/app") as events:
            async for event in events:
                print(event.type, event.path)

Everything streams: a file or directory of any size moves in 1 MiB chunks and the SDK holds a few of them at a time.
Paths in the sandbox are absolute. Failures raise the `SandboxError` of their status (docs/files.md: NotFoundError
for a missing path, ConflictError when it exists, FailedPreconditionError for a directory where a file is wanted...).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import ConflictError, InvalidArgumentError, NotFoundError, from_rpc_error
from microvm_sandbox.file_types import EVENT_TYPES, EntryInfo, FilesystemEvent, FilesystemEventType, WriteInfo
from microvm_sandbox.transfer import (
    CHUNK,
    Data,
    add_bytes,
    add_path,
    chunks_of,
    send_until_refused,
    tar_chunks,
    tune_allocator,
    untar_into,
)

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox

T = TypeVar("T")
TRANSFER_TIMEOUT = 3600.0


class AsyncWatchHandle:
    """A running watch: iterate it (`async for event in handle`), or take what arrived with `get_new_events()`;
    `stop()` (or leaving `async with`) ends it in the sandbox too. At most `buffer` events wait here: beyond that
    the oldest go and an overflow event says so."""

    def __init__(self, call: Any, buffer: int = 10_000) -> None:
        self._call, self._buffer = call, buffer
        self._events: asyncio.Queue[FilesystemEvent | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> AsyncWatchHandle:
        try:
            first = await self._call.__aiter__().__anext__()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        if first.WhichOneof("event") != "started":
            raise InvalidArgumentError("the watch did not start")
        self._task = asyncio.ensure_future(self._pump())
        return self

    async def _pump(self) -> None:
        try:
            async for response in self._call:
                kind = response.WhichOneof("event")
                if kind == "change":
                    change = response.change
                    event = FilesystemEvent(
                        EVENT_TYPES.get(change.type), change.path, change.previous_path, change.directory
                    )
                elif kind == "overflow":
                    event = FilesystemEvent(None, "", overflow=True)
                else:
                    continue
                if self._events.qsize() >= self._buffer:
                    self._events.get_nowait()
                    event = FilesystemEvent(None, "", overflow=True)
                self._events.put_nowait(event)
            self._events.put_nowait(None)
        except grpc.aio.AioRpcError as error:
            self._events.put_nowait(None if error.code() == grpc.StatusCode.CANCELLED else from_rpc_error(error))

    def __aiter__(self) -> AsyncWatchHandle:
        return self

    async def __anext__(self) -> FilesystemEvent:
        item = await self._events.get()
        if item is None:
            self._events.put_nowait(None)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def get_new_events(self) -> builtins.list[FilesystemEvent]:
        """The events that arrived since the last call, without waiting."""
        events = []
        while not self._events.empty():
            item = self._events.get_nowait()
            if item is None or isinstance(item, BaseException):
                self._events.put_nowait(item)
                break
            events.append(item)
        return events

    async def stop(self) -> None:
        self._call.cancel()
        if self._task is not None:
            await asyncio.wait([self._task])

    def __await__(self) -> Generator[Any, None, AsyncWatchHandle]:  # `handle = await files.watch_dir(...)`
        return self._start().__await__()

    async def __aenter__(self) -> AsyncWatchHandle:
        return await self._start() if self._task is None else self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class AsyncFiles:
    """The filesystem of one sandbox (`sandbox.files`)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def _stub(self) -> Any:
        return self._sandbox.client.stub

    @property
    def _metadata(self) -> Any:
        return self._sandbox.client.metadata

    async def _call(self, method: str, request: Any, idempotent: bool = False) -> Any:
        return await self._sandbox.client.call(method, request, idempotent=idempotent)

    @overload
    async def read(
        self, path: str, *, format: Literal["bytes"] = "bytes", offset: int = 0, length: int = 0
    ) -> bytes: ...

    @overload
    async def read(self, path: str, *, format: Literal["text"], offset: int = 0, length: int = 0) -> str: ...

    async def read(
        self, path: str, *, format: Literal["bytes", "text"] = "bytes", offset: int = 0, length: int = 0
    ) -> bytes | str:
        """The file at `path` (from byte `offset`, at most `length` bytes; 0: to the end), as bytes or, with
        format="text", decoded UTF-8. NotFoundError when it does not exist. For big files see `read_stream`."""
        data = b"".join([chunk async for chunk in self.read_stream(path, offset=offset, length=length)])
        return data.decode() if format == "text" else data

    async def read_stream(self, path: str, *, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The file at `path` as it arrives, in chunks of at most 1 MiB."""
        tune_allocator()
        request = api.ReadFileRequest(sandbox=self._sandbox.name, path=path, offset=offset, length=length)
        call = self._stub.ReadFile(request, metadata=self._metadata, timeout=TRANSFER_TIMEOUT)
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def write(
        self, path: str, data: Data, *, mode: int = 0o644, make_parents: bool = True, append: bool = False
    ) -> EntryInfo:
        """Writes `data` to `path`, replacing the file (readers never see half of it) or, with append=True, adding
        to its end: bytes, str (UTF-8), a binary file object or chunks (iterable or async iterable of bytes), sent
        as they come. Parent directories are made unless make_parents=False. Returns the file as written."""
        header = api.WriteFileHeader(
            sandbox=self._sandbox.name, path=path, mode=mode, make_parents=make_parents, append=append
        )

        async def requests() -> AsyncIterator[api.WriteFileRequest]:
            yield api.WriteFileRequest(header=header)
            async for chunk in chunks_of(data):
                yield api.WriteFileRequest(data=chunk)

        try:
            reply = await send_until_refused(
                lambda r: self._stub.WriteFile(r, metadata=self._metadata, timeout=TRANSFER_TIMEOUT), requests()
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return EntryInfo.of(reply.file)

    async def write_many(self, files: Mapping[str, bytes | str], *, mode: int = 0o644) -> WriteInfo:
        """Writes every `path: data` of `files` in one call (one tar stream extracted in the sandbox). Paths are
        absolute; their directories are made as needed."""
        if not files:
            return WriteInfo(0, 0, "")
        paths = [posixpath.normpath(p) for p in files]
        if not all(p.startswith("/") and p != "/" for p in paths):
            raise InvalidArgumentError("write_many takes absolute file paths")
        root = posixpath.commonpath([posixpath.dirname(p) for p in paths])

        def fill(tar: Any) -> None:
            for path, data in zip(paths, files.values(), strict=True):
                add_bytes(tar, posixpath.relpath(path, root), data.encode() if isinstance(data, str) else data, mode)

        return await self.upload_archive(root, tar_chunks(fill))

    async def upload_archive(self, directory: str, chunks: AsyncIterator[bytes]) -> WriteInfo:
        """Extracts the tar archive `chunks` (an async iterator of bytes, streamed as it comes) under `directory`
        in the sandbox (made as needed). Hostile members are refused (docs/files.md)."""

        async def requests() -> AsyncIterator[api.UploadArchiveRequest]:
            yield api.UploadArchiveRequest(header=api.UploadArchiveHeader(sandbox=self._sandbox.name, path=directory))
            async for chunk in chunks:
                yield api.UploadArchiveRequest(data=chunk)

        try:
            reply = await send_until_refused(
                lambda r: self._stub.UploadArchive(r, metadata=self._metadata, timeout=TRANSFER_TIMEOUT), requests()
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return WriteInfo(reply.entries, reply.bytes, reply.sha256)

    async def download_archive(self, path: str) -> AsyncIterator[bytes]:
        """`path` (a file or a directory with everything below it) as a tar archive, chunk by chunk; its members
        are named under the base name of `path`."""
        request = api.DownloadArchiveRequest(sandbox=self._sandbox.name, path=path)
        call = self._stub.DownloadArchive(request, metadata=self._metadata, timeout=TRANSFER_TIMEOUT)
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def list(self, path: str, *, depth: int = 1) -> builtins.list[EntryInfo]:
        """The entries of the directory `path`, sorted by name; with depth > 1 those of its subdirectories too
        (down to `depth` levels). NotFoundError when it does not exist."""
        reply = await self._call("ListDir", api.ListDirRequest(sandbox=self._sandbox.name, path=path), True)
        entries = [EntryInfo.of(e) for e in reply.entries]
        if depth > 1:
            for entry in [e for e in entries if e.is_dir]:
                entries += await self.list(entry.path, depth=depth - 1)
        return entries

    async def exists(self, path: str) -> bool:
        """Whether anything (a link counts, even a broken one) is at `path`."""
        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    async def stat(self, path: str) -> EntryInfo:
        """What is at `path` (a link is described, not followed). NotFoundError when nothing is."""
        reply = await self._call("Stat", api.StatRequest(sandbox=self._sandbox.name, path=path), True)
        return EntryInfo.of(reply.file)

    get_info = stat

    async def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        """Makes the directory `path` and its missing parents (`mkdir -p`); False when it already existed."""
        request = api.MakeDirRequest(sandbox=self._sandbox.name, path=path, mode=mode)
        try:
            await self._call("MakeDir", request)
            return True
        except ConflictError:
            if (await self.stat(path)).is_dir:
                return False
            raise
        except NotFoundError:
            request.parents = True
            await self._call("MakeDir", request)
            return True

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        """Removes the file, link or directory at `path`, a directory with everything in it (recursive=False:
        only when empty, else FailedPreconditionError). NotFoundError when nothing is there."""
        await self._call("Remove", api.RemoveRequest(sandbox=self._sandbox.name, path=path, recursive=recursive))

    async def rename(self, old_path: str, new_path: str, *, overwrite: bool = False) -> EntryInfo:
        """Moves `old_path` to `new_path` (any directory of the same filesystem); ConflictError when `new_path`
        exists unless overwrite=True. Returns the entry at its new path."""
        request = api.RenameRequest(
            sandbox=self._sandbox.name, source=old_path, destination=new_path, overwrite=overwrite
        )
        return EntryInfo.of((await self._call("Rename", request)).file)

    def watch_dir(self, path: str, *, recursive: bool = False) -> AsyncWatchHandle:
        """Watches the directory `path` (recursive: and everything below it, directories made later included):
        `async with files.watch_dir(p) as events: async for event in events: ...`, or `handle = await
        files.watch_dir(p)` then `handle.get_new_events()` / `await handle.stop()`."""
        request = api.WatchDirRequest(sandbox=self._sandbox.name, path=path, recursive=recursive)
        return AsyncWatchHandle(self._stub.WatchDir(request, metadata=self._metadata))

    async def upload(self, local: str | os.PathLike[str], remote: str) -> WriteInfo | EntryInfo:
        """Copies the local file or directory `local` to `remote` in the sandbox, streaming: a file becomes the file
        `remote`; a directory's contents go under the directory `remote` (made as needed), in one tar stream."""
        source = Path(local)
        if not source.is_dir():
            handle = await asyncio.to_thread(open, source, "rb")
            try:
                return await self.write(remote, handle, mode=stat.S_IMODE(os.stat(source).st_mode))
            finally:
                handle.close()

        def fill(tar: Any) -> None:
            for entry in sorted(os.listdir(source)):
                add_path(tar, source / entry, entry)

        return await self.upload_archive(remote, tar_chunks(fill))

    async def download(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copies `remote` to the local `local`, streaming: a file becomes the file `local` (written whole or not at
        all; into it when `local` is a directory); a directory's contents go under the directory `local` (made as
        needed)."""
        target = Path(local)
        if (await self.stat(remote)).is_dir:
            await untar_into(self.download_archive(remote), target, strip=1)
            return
        if target.is_dir():
            target = target / posixpath.basename(posixpath.normpath(remote))
        partial = target.with_name(f".{target.name}.part")
        handle = await asyncio.to_thread(open, partial, "wb")
        try:
            async for chunk in self.read_stream(remote):
                await asyncio.to_thread(handle.write, chunk)
            handle.close()
            await asyncio.to_thread(os.replace, partial, target)
        finally:
            handle.close()
            if partial.exists():
                partial.unlink()


__all__ = [
    "CHUNK",
    "AsyncFiles",
    "AsyncWatchHandle",
    "EntryInfo",
    "FilesystemEvent",
    "FilesystemEventType",
    "WriteInfo",
]


def __getattr__(name: str) -> Any:  # the sync twins live in files_sync.py (it imports this module)
    if name in ("Files", "WatchHandle"):
        from microvm_sandbox import files_sync

        return getattr(files_sync, name)
    raise AttributeError(name)
