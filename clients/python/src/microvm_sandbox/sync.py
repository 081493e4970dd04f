"""The synchronous SDK: the async one run on a private event loop, so both behave the same.

with Sandbox.create(template="default") as sb:
    print(sb.exec(["echo", "hi"]).stdout)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from microvm.sandbox.v1 import sandbox_pb2
from microvm_sandbox.aio import (
    AsyncClient,
    AsyncSandbox,
    ConsoleOutput,
    ExecEvent,
    ExecResult,
    FileEntry,
    Snapshot,
    list_sandboxes,
    list_snapshots,
)

T = TypeVar("T")


class _Loop:
    """One event loop on a daemon thread, shared by every sync object of the process."""

    _shared: _Loop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="microvm-sandbox-sdk", daemon=True).start()

    @classmethod
    def shared(cls) -> _Loop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()


class Client:
    def __init__(self, address: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        self._loop = _Loop.shared()

        async def make() -> AsyncClient:
            return AsyncClient(address, api_key, timeout)

        self.aio = self._loop.run(make())

    def list_sandboxes(self, label_filter: dict[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
        return self._loop.run(list_sandboxes(self.aio, label_filter))

    def list_snapshots(self, source_sandbox: str = "") -> list[sandbox_pb2.Snapshot]:
        return self._loop.run(list_snapshots(self.aio, source_sandbox))

    def close(self) -> None:
        self._loop.run(self.aio.close())


class Sandbox:
    def __init__(self, inner: AsyncSandbox) -> None:
        self.aio = inner
        self._loop = _Loop.shared()

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def id(self) -> str:
        return self.aio.id

    @classmethod
    def create(
        cls,
        template: str = "default",
        *,
        timeout: float | None = None,
        vcpus: int = 1,
        memory_mib: int = 256,
        labels: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
        client: Client | None = None,
        **connect: Any,
    ) -> Sandbox:
        loop = _Loop.shared()

        async def make() -> AsyncSandbox:
            return await AsyncSandbox.create(
                template,
                timeout=timeout,
                vcpus=vcpus,
                memory_mib=memory_mib,
                labels=labels,
                egress=egress,
                allow=allow,
                node_selector=node_selector,
                client=client.aio if client else None,
                **connect,
            )

        return cls(loop.run(make()))

    @classmethod
    def connect(cls, sandbox_id: str, client: Client | None = None, **connect: Any) -> Sandbox:
        return cls(_Loop.shared().run(AsyncSandbox.connect(sandbox_id, client.aio if client else None, **connect)))

    @classmethod
    def restore(cls, snapshot: Snapshot | str, client: Client | None = None, **connect: Any) -> Sandbox:
        return cls(_Loop.shared().run(AsyncSandbox.restore(snapshot, client.aio if client else None, **connect)))

    def exec(self, command: str | Sequence[str], **options: Any) -> ExecResult:
        return self._loop.run(self.aio.exec(command, **options))

    def exec_stream(self, command: str | Sequence[str], **options: Any) -> Iterator[ExecEvent]:
        stream = self.aio.exec_stream(command, **options)
        while True:
            try:
                yield self._loop.run(stream.__anext__())
            except StopAsyncIteration:
                return

    def run_code(self, language: str, code: str, **options: Any) -> ExecResult:
        return self._loop.run(self.aio.run_code(language, code, **options))

    def write(self, path: str, data: bytes | str, **options: Any) -> None:
        self._loop.run(self.aio.write(path, data, **options))

    def read(self, path: str) -> bytes:
        return self._loop.run(self.aio.read(path))

    def upload(self, local: str | Path, remote: str) -> None:
        self._loop.run(self.aio.upload(local, remote))

    def download(self, remote: str, local: str | Path) -> None:
        self._loop.run(self.aio.download(remote, local))

    def ls(self, path: str = "/") -> list[FileEntry]:
        return self._loop.run(self.aio.ls(path))

    def read_console_log(self, *, tail_bytes: int = 0, offset: int = 0, length: int = 0) -> ConsoleOutput:
        return self._loop.run(self.aio.read_console_log(tail_bytes=tail_bytes, offset=offset, length=length))

    def snapshot(self, labels: dict[str, str] | None = None, ttl: float | None = None) -> Snapshot:
        return self._loop.run(self.aio.snapshot(labels, ttl))

    def fork(self, count: int = 1) -> list[Sandbox]:
        return [Sandbox(clone) for clone in self._loop.run(self.aio.fork(count))]

    @property
    def ip_address(self) -> str:
        return self.aio.ip_address

    def set_egress(self, egress: str | None = None, allow: Sequence[str] = ()) -> None:
        self._loop.run(self.aio.set_egress(egress, allow))

    def expose_port(self, guest_port: int, host_port: int = 0, host_address: str = "") -> sandbox_pb2.ExposedPort:
        return self._loop.run(self.aio.expose_port(guest_port, host_port, host_address))

    def unexpose_port(
        self, guest_port: int, host_port: int = 0, host_address: str = ""
    ) -> list[sandbox_pb2.ExposedPort]:
        return self._loop.run(self.aio.unexpose_port(guest_port, host_port, host_address))

    def pause(self) -> None:
        self._loop.run(self.aio.pause())

    def resume(self) -> None:
        self._loop.run(self.aio.resume())

    def kill(self) -> None:
        self._loop.run(self.aio.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
