"""`Sandbox.files`: the file API for synchronous code, each method the `AsyncFiles` one run on the SDK's loop."""

from __future__ import annotations

import builtins
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Literal, Protocol, TypeVar

from microvm_sandbox.file_types import EntryInfo, FilesystemEvent, WriteInfo
from microvm_sandbox.files import AsyncFiles, AsyncWatchHandle
from microvm_sandbox.transfer import Data

T = TypeVar("T")


class Runner(Protocol):
    """Runs a coroutine on the SDK's loop and returns its result (sync.py's `_Loop.run`)."""

    def __call__(self, awaitable: Awaitable[T]) -> T: ...


class WatchHandle:
    """A running watch for synchronous code: iterate it, or `get_new_events()`; `stop()` ends it."""

    def __init__(self, inner: AsyncWatchHandle, run: Runner) -> None:
        self.aio, self._run = inner, run

    def __iter__(self) -> Iterator[FilesystemEvent]:
        while True:
            try:
                yield self._run(self.aio.__anext__())
            except StopAsyncIteration:
                return

    def get_new_events(self) -> builtins.list[FilesystemEvent]:
        return self._run(_now(self.aio.get_new_events))

    def stop(self) -> None:
        self._run(self.aio.stop())

    def __enter__(self) -> WatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _now(function: Callable[[], T]) -> T:
    return function()


class Files:
    """The filesystem of one sandbox, for synchronous code (`Sandbox.files`): the methods of `AsyncFiles`."""

    def __init__(self, inner: AsyncFiles, run: Runner) -> None:
        self.aio, self._run = inner, run

    def run(self, awaitable: Awaitable[T]) -> T:
        """Runs a coroutine of `aio` (the AsyncFiles) on the SDK's loop: for composing the streaming pieces
        (`upload_archive`, `download_archive`, microvm_sandbox.transfer) from synchronous code."""
        return self._run(awaitable)

    def read(
        self, path: str, *, format: Literal["bytes", "text"] = "bytes", offset: int = 0, length: int = 0
    ) -> bytes | str:
        """As `AsyncFiles.read`: bytes, or str with format="text"."""
        if format == "text":
            return self._run(self.aio.read(path, format="text", offset=offset, length=length))
        return self._run(self.aio.read(path, offset=offset, length=length))

    def read_stream(self, path: str, *, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        stream = self.aio.read_stream(path, offset=offset, length=length)
        while True:
            try:
                yield self._run(stream.__anext__())
            except StopAsyncIteration:
                return

    def write(
        self, path: str, data: Data, *, mode: int = 0o644, make_parents: bool = True, append: bool = False
    ) -> EntryInfo:
        return self._run(self.aio.write(path, data, mode=mode, make_parents=make_parents, append=append))

    def write_many(self, files: Mapping[str, bytes | str], *, mode: int = 0o644) -> WriteInfo:
        return self._run(self.aio.write_many(files, mode=mode))

    def list(self, path: str, *, depth: int = 1) -> builtins.list[EntryInfo]:
        return self._run(self.aio.list(path, depth=depth))

    def exists(self, path: str) -> bool:
        return self._run(self.aio.exists(path))

    def stat(self, path: str) -> EntryInfo:
        return self._run(self.aio.stat(path))

    get_info = stat

    def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        return self._run(self.aio.make_dir(path, mode=mode))

    def remove(self, path: str, *, recursive: bool = True) -> None:
        self._run(self.aio.remove(path, recursive=recursive))

    def rename(self, old_path: str, new_path: str, *, overwrite: bool = False) -> EntryInfo:
        return self._run(self.aio.rename(old_path, new_path, overwrite=overwrite))

    def watch_dir(self, path: str, *, recursive: bool = False) -> WatchHandle:
        async def start() -> AsyncWatchHandle:
            return await self.aio.watch_dir(path, recursive=recursive)

        return WatchHandle(self._run(start()), self._run)

    def upload(self, local: str | os.PathLike[str], remote: str) -> WriteInfo | EntryInfo:
        return self._run(self.aio.upload(local, remote))

    def download(self, remote: str, local: str | os.PathLike[str]) -> None:
        self._run(self.aio.download(remote, local))
