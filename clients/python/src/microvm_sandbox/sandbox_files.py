"""A sandbox's file and console methods, mixed into `AsyncSandbox`: thin delegates to `files` (the sandbox's
filesystem: microvm_sandbox.files) and the serial console's log."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import from_rpc_error
from microvm_sandbox.files import AsyncFiles
from microvm_sandbox.models import ConsoleOutput, FileEntry

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient


class AsyncFileMethods:
    """`AsyncSandbox`'s file and console methods (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    # --- files (thin delegates to `files`, the sandbox's filesystem: microvm_sandbox.files) ------------
    @property
    def files(self) -> AsyncFiles:
        """The sandbox's filesystem, E2B-style: read/write (streaming), write_many, list, exists, stat, make_dir,
        remove, rename, watch_dir, upload/download of files and directories."""
        return AsyncFiles(self)  # type: ignore[arg-type]

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True) -> None:
        """Writes `data` (str is UTF-8 encoded) to the absolute `path`, replacing the file; parent directories
        are created unless make_parents=False. (`files.write` also takes file objects and chunk iterables.)"""
        await self.files.write(path, data, mode=mode, make_parents=make_parents)

    async def read(self, path: str) -> bytes:
        """The whole file at the absolute `path`. NotFoundError when it does not exist."""
        data: bytes = await self.files.read(path)
        return data

    async def upload(self, local: str | Path, remote: str) -> None:
        """Copies the local file or directory `local` to `remote` in the sandbox, streaming."""
        await self.files.upload(local, remote)

    async def download(self, remote: str, local: str | Path) -> None:
        """Copies the file or directory `remote` in the sandbox to `local`, streaming."""
        await self.files.download(remote, local)

    async def ls(self, path: str = "/") -> builtins.list[FileEntry]:
        """The entries of the directory `path`."""
        return [FileEntry(e.path, e.is_dir, e.size, e.mode) for e in await self.files.list(path)]

    # --- console --------------------------------------------------------------------------------------
    async def read_console_log(self, *, tail_bytes: int = 0, offset: int = 0, length: int = 0) -> ConsoleOutput:
        """The sandbox's serial console (kernel messages, whatever the guest writes to /dev/console): the newest
        `tail_bytes`, or `length` bytes (0: all) from console `offset`. Its node keeps only the newest output (2 MiB
        by default): a read from before that starts at the oldest byte kept, as the result's `offset` says."""
        request = api.ReadConsoleLogRequest(sandbox=self.name, tail_bytes=tail_bytes, offset=offset, length=length)
        first, chunks = None, []
        try:
            async for chunk in self.client.stub.ReadConsoleLog(
                request, metadata=self.client.metadata, timeout=self.client.timeout
            ):
                first = chunk.offset if first is None else first
                chunks.append(chunk.data)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return ConsoleOutput(offset if first is None else first, b"".join(chunks))
