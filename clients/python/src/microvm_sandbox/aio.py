"""The asynchronous SDK: `AsyncSandbox` over the gateway's gRPC API.

async with AsyncSandbox.create(template="default", timeout=600) as sb:
    result = await sb.exec(["python3", "-c", "print(6*7)"])
    print(result.stdout)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import InvalidArgumentError, SandboxError, UnavailableError, from_rpc_error

T = TypeVar("T")
CHUNK = 1 << 20
DEFAULT_ADDRESS = "127.0.0.1:50051"
RETRIES = 3


def default_api_key() -> str:
    if key := os.environ.get("MVM_API_KEY"):
        return key.strip()
    path = Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm") / "admin.key"
    try:
        return path.read_text().strip()
    except OSError:
        raise SandboxError(
            f"no API key: pass api_key=, set MVM_API_KEY, or run `make up` (writes {path})", code="UNAUTHENTICATED"
        ) from None


@dataclass
class Started:
    pid: int


@dataclass
class Stdout:
    data: bytes


@dataclass
class Stderr:
    data: bytes


@dataclass
class Exited:
    exit_code: int | None
    signal: int | None
    timed_out: bool


ExecEvent = Started | Stdout | Stderr | Exited


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass
class ConsoleOutput:
    """Bytes of a sandbox's serial console and the console offset of the first of them; a later read continues
    from `end`. With no bytes, `offset` is the one asked for."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass
class FileEntry:
    path: str
    is_dir: bool
    size: int
    mode: int


@dataclass
class Snapshot:
    name: str
    source_sandbox: str
    parent: str
    size_bytes: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name.removeprefix("snapshots/")


EGRESS_MODES = {
    "none": sandbox_pb2.EGRESS_MODE_NONE,
    "full": sandbox_pb2.EGRESS_MODE_FULL,
    "allow-list": sandbox_pb2.EGRESS_MODE_ALLOW_LIST,
}


def egress_policy(egress: str | None = None, allow: Sequence[str] = ()) -> sandbox_pb2.NetworkPolicy:
    """A NetworkPolicy from `egress` (`none`, `full` or `allow-list`) and allow rules written `CIDR` or
    `CIDR:PORT,PORT` (e.g. `203.0.113.0/24:80,443`); rules alone mean `allow-list`."""
    mode = egress or ("allow-list" if allow else "none")
    if mode not in EGRESS_MODES:
        raise InvalidArgumentError(f"egress must be one of {', '.join(EGRESS_MODES)}, got {mode!r}")
    policy = sandbox_pb2.NetworkPolicy(egress=EGRESS_MODES[mode])
    for rule in allow:
        cidr, ports = rule, ""
        network, _, suffix = rule.partition("/")
        if ":" in suffix:  # the prefix length is followed by ports (IPv6 colons come before the slash)
            length, _, ports = suffix.partition(":")
            cidr = f"{network}/{length}"
        try:
            numbers = [int(p) for p in ports.split(",") if p]
        except ValueError:
            raise InvalidArgumentError(f"allow rule {rule!r}: ports must be numbers, e.g. 10.0.0.0/8:80,443") from None
        policy.allow.add(cidr=cidr, ports=numbers)
    return policy


def _snapshot(message: sandbox_pb2.Snapshot) -> Snapshot:
    return Snapshot(
        name=message.name,
        source_sandbox=message.source_sandbox,
        parent=message.parent_snapshot,
        size_bytes=message.size_bytes,
        labels=dict(message.labels),
    )


def _argv(command: str | Sequence[str]) -> tuple[list[str], bool]:
    return ([command], True) if isinstance(command, str) else (list(command), False)


def _event(message: api.ExecResponse) -> ExecEvent | None:
    kind = message.WhichOneof("event")
    if kind == "started":
        return Started(message.started.pid)
    if kind == "stdout":
        return Stdout(message.stdout)
    if kind == "stderr":
        return Stderr(message.stderr)
    if kind == "exited":
        exited = message.exited
        is_signal = exited.WhichOneof("status") == "signal"
        return Exited(None if is_signal else exited.exit_code, exited.signal if is_signal else None, exited.timed_out)
    return None  # keepalive


class AsyncClient:
    """A connection to the gateway: credentials, deadlines, and retries for idempotent calls."""

    def __init__(self, address: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.address = address or os.environ.get("MVM_GATEWAY", DEFAULT_ADDRESS)
        self.metadata = (("authorization", f"Bearer {api_key or default_api_key()}"),)
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(
            self.address,
            options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
        )
        self.stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def call(
        self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None, stub: Any = None
    ) -> Any:
        """`method(request)` on the SandboxService (or on `stub`, e.g. the admin NodeService)."""
        attempt = 0
        while True:
            try:
                return await getattr(stub or self.stub, method)(
                    request, metadata=self.metadata, timeout=timeout or self.timeout
                )
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                attempt += 1
                if not (idempotent and isinstance(failure, UnavailableError) and attempt < RETRIES):
                    raise failure from None
                await asyncio.sleep(0.2 * 2**attempt)

    async def close(self) -> None:
        await self.channel.close()


class _Creating:
    """What `AsyncSandbox.create()` returns: await it, or use it with `async with` (killed on exit)."""

    def __init__(self, make: Callable[[], Awaitable[AsyncSandbox]]) -> None:
        self._make = make
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(self, *exc: object) -> None:
        if self._sandbox is not None:
            await self._sandbox.kill()


class AsyncSandbox:
    def __init__(self, client: AsyncClient, message: sandbox_pb2.Sandbox, owns_client: bool = False) -> None:
        self.client = client
        self.message = message
        self._owns_client = owns_client

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def id(self) -> str:
        return self.message.name.removeprefix("sandboxes/")

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
        client: AsyncClient | None = None,
        **connect: Any,
    ) -> _Creating:
        """A new sandbox. `egress`/`allow`: outbound network policy, see `egress_policy` (default: none).
        `node_selector`: node labels it must be placed on, e.g. {"zone": "a"} (default: any node)."""
        policy = egress_policy(egress, allow)

        async def make() -> AsyncSandbox:
            own = client is None
            active = client or AsyncClient(**connect)
            sandbox = sandbox_pb2.Sandbox(
                template=template,
                vcpus=vcpus,
                memory_mib=memory_mib,
                labels=labels or {},
                network_policy=policy,
                node_selector=node_selector or {},
            )
            if timeout:
                sandbox.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout)))
            reply = await active.call("CreateSandbox", api.CreateSandboxRequest(sandbox=sandbox), timeout=300)
            return cls(active, reply.sandbox, owns_client=own)

        return _Creating(make)

    @classmethod
    async def connect(cls, sandbox_id: str, client: AsyncClient | None = None, **connect: Any) -> AsyncSandbox:
        active = client or AsyncClient(**connect)
        name = sandbox_id if sandbox_id.startswith("sandboxes/") else f"sandboxes/{sandbox_id}"
        reply = await active.call("GetSandbox", api.GetSandboxRequest(name=name), idempotent=True)
        return cls(active, reply.sandbox, owns_client=client is None)

    @classmethod
    async def restore(cls, snapshot: Snapshot | str, client: AsyncClient | None = None, **connect: Any) -> AsyncSandbox:
        active = client or AsyncClient(**connect)
        name = (
            snapshot.name
            if isinstance(snapshot, Snapshot)
            else (snapshot if snapshot.startswith("snapshots/") else f"snapshots/{snapshot}")
        )
        reply = await active.call("RestoreSnapshot", api.RestoreSnapshotRequest(snapshot=name), timeout=600)
        return cls(active, reply.sandbox, owns_client=client is None)

    # --- processes ----------------------------------------------------------------------------------
    async def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bytes = b"",
    ) -> AsyncIterator[ExecEvent]:
        """Events as they happen: Started, Stdout/Stderr chunks, then Exited."""
        argv, shell = _argv(command)
        process = api.ProcessConfig(argv=argv, shell=shell, env=env or {}, cwd=cwd, user=user)
        if timeout:
            process.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout)))
        call = self.client.stub.Exec(
            api.ExecRequest(sandbox=self.name, process=process, stdin=stdin),
            metadata=self.client.metadata,
            timeout=(timeout or 3600) + 30,
        )
        try:
            async for message in call:
                event = _event(message)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def exec(self, command: str | Sequence[str], **options: Any) -> ExecResult:
        stdout, stderr = bytearray(), bytearray()
        async for event in self.exec_stream(command, **options):
            if isinstance(event, Stdout):
                stdout += event.data
            elif isinstance(event, Stderr):
                stderr += event.data
            elif isinstance(event, Exited):
                return ExecResult(bytes(stdout), bytes(stderr), event.exit_code, event.signal, event.timed_out)
        raise SandboxError("the process stream ended without an exit status", code="UNAVAILABLE")

    async def run_code(self, language: str, code: str, **options: Any) -> ExecResult:
        runners = {
            "python": ["python3", "-c", code],
            "python3": ["python3", "-c", code],
            "sh": ["sh", "-c", code],
            "bash": ["sh", "-c", code],
            "shell": ["sh", "-c", code],
        }
        if language.lower() not in runners:
            raise InvalidArgumentError(
                f"unsupported language {language!r}; supported: {', '.join(sorted(runners))}", code="INVALID_ARGUMENT"
            )
        return await self.exec(runners[language.lower()], **options)

    # --- files --------------------------------------------------------------------------------------
    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True) -> None:
        payload = data.encode() if isinstance(data, str) else data

        async def requests() -> AsyncIterator[api.WriteFileRequest]:
            yield api.WriteFileRequest(
                header=api.WriteFileHeader(sandbox=self.name, path=path, mode=mode, make_parents=make_parents)
            )
            for offset in range(0, len(payload), CHUNK):
                yield api.WriteFileRequest(data=payload[offset : offset + CHUNK])

        try:
            await self.client.stub.WriteFile(requests(), metadata=self.client.metadata, timeout=600)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def read(self, path: str) -> bytes:
        chunks = []
        try:
            async for chunk in self.client.stub.ReadFile(
                api.ReadFileRequest(sandbox=self.name, path=path), metadata=self.client.metadata, timeout=600
            ):
                chunks.append(chunk.data)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return b"".join(chunks)

    async def upload(self, local: str | Path, remote: str) -> None:
        await self.write(remote, await asyncio.to_thread(Path(local).read_bytes))

    async def download(self, remote: str, local: str | Path) -> None:
        data = await self.read(remote)
        await asyncio.to_thread(Path(local).write_bytes, data)

    async def ls(self, path: str = "/") -> list[FileEntry]:
        reply = await self.client.call("ListDir", api.ListDirRequest(sandbox=self.name, path=path), idempotent=True)
        return [FileEntry(e.path, e.type == sandbox_pb2.FILE_TYPE_DIRECTORY, e.size, e.mode) for e in reply.entries]

    # --- console ------------------------------------------------------------------------------------
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

    # --- lifecycle ----------------------------------------------------------------------------------
    async def snapshot(self, labels: dict[str, str] | None = None, ttl: float | None = None) -> Snapshot:
        request = api.CreateSnapshotRequest(sandbox=self.name, labels=labels or {})
        if ttl:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
        reply = await self.client.call("CreateSnapshot", request, timeout=600)
        return _snapshot(reply.snapshot)

    async def fork(self, count: int = 1) -> list[AsyncSandbox]:
        reply = await self.client.call("ForkSandbox", api.ForkSandboxRequest(name=self.name, count=count), timeout=900)
        return [AsyncSandbox(self.client, message) for message in reply.sandboxes]

    @property
    def ip_address(self) -> str:
        """The guest's address on its node's bridge (empty where networking is off)."""
        return self.message.ip_address

    async def set_egress(self, egress: str | None = None, allow: Sequence[str] = ()) -> None:
        """Replaces the outbound policy at once (connections it no longer allows stop)."""
        sandbox = sandbox_pb2.Sandbox(name=self.name, network_policy=egress_policy(egress, allow))
        self.message = (
            await self.client.call(
                "UpdateSandbox",
                api.UpdateSandboxRequest(
                    sandbox=sandbox, update_mask=field_mask_pb2.FieldMask(paths=["network_policy"])
                ),
            )
        ).sandbox

    async def expose_port(self, guest_port: int, host_port: int = 0, host_address: str = "") -> sandbox_pb2.ExposedPort:
        """Makes `guest_port` reachable at host_address:host_port on the sandbox's node (loopback and a free
        port of the node's range, 30000-32767 by default); returns the mapping. Addresses and ports the node does
        not allow raise InvalidArgumentError. It lasts until `unexpose_port` or the sandbox's end."""
        reply = await self.client.call(
            "ExposePort",
            api.ExposePortRequest(
                sandbox=self.name, guest_port=guest_port, host_port=host_port, host_address=host_address
            ),
        )
        port: sandbox_pb2.ExposedPort = reply.port
        return port

    async def unexpose_port(
        self, guest_port: int, host_port: int = 0, host_address: str = ""
    ) -> list[sandbox_pb2.ExposedPort]:
        """Stops exposing `guest_port` (only the mapping on host_address:host_port when given); returns the
        mappings removed. NotFoundError when nothing matches."""
        reply = await self.client.call(
            "UnexposePort",
            api.UnexposePortRequest(
                sandbox=self.name, guest_port=guest_port, host_port=host_port, host_address=host_address
            ),
        )
        return list(reply.ports)

    async def pause(self) -> None:
        self.message = (await self.client.call("PauseSandbox", api.PauseSandboxRequest(name=self.name))).sandbox

    async def resume(self) -> None:
        self.message = (await self.client.call("ResumeSandbox", api.ResumeSandboxRequest(name=self.name))).sandbox

    async def refresh(self) -> sandbox_pb2.Sandbox:
        self.message = (
            await self.client.call("GetSandbox", api.GetSandboxRequest(name=self.name), idempotent=True)
        ).sandbox
        return self.message

    async def kill(self) -> None:
        """Deletes the sandbox and everything it holds. A second kill is a no-op."""
        try:
            await self.client.call("DeleteSandbox", api.DeleteSandboxRequest(name=self.name), timeout=120)
        except SandboxError as error:
            if error.code != "NOT_FOUND":
                raise
        finally:
            if self._owns_client:
                await self.client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


async def list_sandboxes(client: AsyncClient, label_filter: dict[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
    query = " ".join(f"labels.{k}={v}" for k, v in (label_filter or {}).items())
    reply = await client.call("ListSandboxes", api.ListSandboxesRequest(filter=query, page_size=1000), idempotent=True)
    return list(reply.sandboxes)


async def list_snapshots(client: AsyncClient, source_sandbox: str = "") -> list[sandbox_pb2.Snapshot]:
    name = (
        source_sandbox
        if not source_sandbox or source_sandbox.startswith("sandboxes/")
        else f"sandboxes/{source_sandbox}"
    )
    reply = await client.call(
        "ListSnapshots", api.ListSnapshotsRequest(source_sandbox=name, page_size=1000), idempotent=True
    )
    return list(reply.snapshots)


# `from microvm_sandbox.aio import Sandbox` reads naturally in async code: `async with Sandbox.create() as sb`.
Sandbox = AsyncSandbox
