"""The asynchronous SDK: `AsyncSandbox` over the gateway's gRPC API.

    async with AsyncSandbox.create(template="default", timeout=600, envs={"MODE": "test"}) as sb:
        result = await sb.exec(["python3", "-c", "print(6*7)"])
        print(result.stdout)

Every method that calls the server raises a `SandboxError` subclass on failure (see `microvm_sandbox.errors`).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

from google.protobuf import field_mask_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.client import (
    AsyncClient,
    default_api_key,
    list_sandboxes,
    list_snapshots,
    sandbox_name,
    snapshot_name,
)
from microvm_sandbox.code import AsyncCodeMethods
from microvm_sandbox.desktop import AsyncDesktopMethods
from microvm_sandbox.errors import InvalidArgumentError, SandboxError
from microvm_sandbox.exec_stream import AsyncExecStream, duration
from microvm_sandbox.models import (
    ConsoleOutput,
    ExecEvent,
    ExecResult,
    Exited,
    FileEntry,
    SandboxInfo,
    SnapshotInfo,
    Started,
    Stderr,
    Stdout,
    egress_policy,
    state_name,
)
from microvm_sandbox.output import OutputCallback
from microvm_sandbox.port_forward import AsyncPortForwardMethods
from microvm_sandbox.sandbox_exec import AsyncExecMethods
from microvm_sandbox.sandbox_files import AsyncFileMethods
from microvm_sandbox.sandbox_metrics import AsyncMetricsMethods
from microvm_sandbox.sandbox_network import AsyncNetworkMethods
from microvm_sandbox.snapshots import AsyncSnapshot, AsyncSnapshotMethods

__all__ = [
    "AsyncClient",
    "AsyncExecStream",
    "AsyncSandbox",
    "AsyncSnapshot",
    "ConsoleOutput",
    "ExecEvent",
    "ExecResult",
    "Exited",
    "FileEntry",
    "Sandbox",
    "SandboxInfo",
    "Snapshot",
    "SnapshotInfo",
    "Started",
    "Stderr",
    "Stdout",
    "default_api_key",
    "egress_policy",
    "list_sandboxes",
    "list_snapshots",
    "OutputCallback",
    "sandbox_name",
    "snapshot_name",
    "STATES",
]

T = TypeVar("T")
CHUNK = 1 << 20
STATES = {state_name(number): number for number in sandbox_pb2.SandboxState.values()}


# The name the async module has always used.
Snapshot = AsyncSnapshot


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


class AsyncSandbox(
    AsyncExecMethods,
    AsyncFileMethods,
    AsyncCodeMethods,
    AsyncSnapshotMethods,
    AsyncNetworkMethods,
    AsyncPortForwardMethods,
    AsyncDesktopMethods,
    AsyncMetricsMethods,
):
    """A running sandbox: a disposable Linux microVM. Make one with `create()`, `connect()` or `restore()`;
    `kill()` (or leaving `async with`) deletes it. `message` is the server's last description of it."""

    def __init__(self, client: AsyncClient, message: sandbox_pb2.Sandbox, owns_client: bool = False) -> None:
        self.client = client
        self.message = message
        self._owns_client = owns_client

    @property
    def name(self) -> str:
        """The resource name, `sandboxes/{id}`."""
        return self.message.name

    @property
    def id(self) -> str:
        """The sandbox id (what `mvm` and `connect()` take)."""
        return self.message.name.removeprefix("sandboxes/")

    @property
    def state(self) -> str:
        """The state when last seen (`RUNNING`, `PAUSED`, ...): `refresh()` or `get_info()` to ask again."""
        return state_name(self.message.state)

    @property
    def ip_address(self) -> str:
        """The guest's address on its node's bridge (empty where networking is off)."""
        return self.message.ip_address

    @property
    def source_snapshot(self) -> str:
        """The snapshot id this sandbox was restored or forked from; empty for a fresh one."""
        return self.message.source_snapshot.removeprefix("snapshots/")

    @property
    def template_build(self) -> str:
        """The build of its template it started from, `templates/T/builds/B`; empty for a built-in template."""
        return self.message.template_build

    # --- making and finding sandboxes -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        template: str = "default",
        *,
        timeout: float | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        labels: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
        sandbox_id: str = "",
        client: AsyncClient | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> _Creating:
        """A new sandbox, RUNNING when this returns. Await it, or `async with` it to kill it at the end.

        template: `name[:tag]` (`default`: Debian with python3). timeout: lifetime in seconds (server
        default 600; `set_timeout` moves it). vcpus, memory_mib: its size (default: the template's own, else 1
        and 256). labels: your key/values, also what `list(labels=...)` filters on (E2B calls them metadata).
        envs: environment of every command run
        in it (an exec's own `env` wins). egress/allow: outbound network policy, see `egress_policy`
        (default: none). node_selector: node labels it must be placed on, e.g. {"zone": "a"}. sandbox_id: your
        own id, for idempotent retries (ConflictError if it exists). client, or address/api_key: where to
        connect (default: $MVM_GATEWAY, $MVM_API_KEY)."""
        policy = egress_policy(egress, allow)

        async def make() -> AsyncSandbox:
            own = client is None
            active = client or AsyncClient(address, api_key)
            sandbox = sandbox_pb2.Sandbox(
                template=template,
                vcpus=vcpus or 0,
                memory_mib=memory_mib or 0,
                labels=labels or {},
                network_policy=policy,
                node_selector=node_selector or {},
            )
            if envs:
                sandbox.env.update(envs)
            if timeout:
                sandbox.timeout.CopyFrom(duration(timeout))
            request = api.CreateSandboxRequest(sandbox=sandbox, sandbox_id=sandbox_id)
            try:
                reply = await active.call("CreateSandbox", request, timeout=300)
            except BaseException:
                if own:
                    await active.close()
                raise
            return cls(active, reply.sandbox, owns_client=own)

        return _Creating(make)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        client: AsyncClient | None = None,
        *,
        resume: bool = True,
        address: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """An existing sandbox by id (or `sandboxes/ID`). A PAUSED one is resumed first (resume=False leaves it
        paused). SandboxNotFound when it does not exist."""
        own = client is None
        active = client or AsyncClient(address, api_key)
        try:
            request = api.GetSandboxRequest(name=sandbox_name(sandbox_id))
            reply = await active.call("GetSandbox", request, idempotent=True)
            sandbox = cls(active, reply.sandbox, owns_client=own)
            if resume and reply.sandbox.state == sandbox_pb2.SANDBOX_STATE_PAUSED:
                await sandbox.resume()
        except BaseException:
            if own:
                await active.close()
            raise
        return sandbox

    @classmethod
    async def restore(
        cls,
        snapshot: SnapshotInfo | str,
        client: AsyncClient | None = None,
        *,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """A new sandbox from a snapshot (object, id or name): memory, processes and files as they were.
        timeout, labels, egress/allow, node_selector: as in `create` (size and template come from the snapshot).
        DataLossError when the snapshot is corrupt; nothing is booted then."""
        own = client is None
        active = client or AsyncClient(address, api_key)
        wanted = sandbox_pb2.Sandbox(labels=labels or {}, node_selector=node_selector or {})
        if egress or allow:
            wanted.network_policy.CopyFrom(egress_policy(egress, allow))
        if timeout:
            wanted.timeout.CopyFrom(duration(timeout))
        request = api.RestoreSnapshotRequest(snapshot=snapshot_name(snapshot), sandbox=wanted)
        try:
            reply = await active.call("RestoreSnapshot", request, timeout=600)
        except BaseException:
            if own:
                await active.close()
            raise
        return cls(active, reply.sandbox, owns_client=own)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def _update(self, change: sandbox_pb2.Sandbox, *paths: str) -> None:
        change.name = self.name
        request = api.UpdateSandboxRequest(sandbox=change, update_mask=field_mask_pb2.FieldMask(paths=paths))
        self.message = (await self.client.call("UpdateSandbox", request)).sandbox

    async def set_timeout(self, seconds: float) -> None:
        """The sandbox is now deleted `seconds` from now (1 s up to the server's maximum, 24 h by default)."""
        await self._update(sandbox_pb2.Sandbox(timeout=duration(seconds)), "timeout")

    async def set_labels(self, labels: dict[str, str]) -> None:
        """Replaces the sandbox's labels."""
        await self._update(sandbox_pb2.Sandbox(labels=labels), "labels")

    async def pause(self) -> None:
        """Stops the guest's vCPUs, keeping its memory (the timeout keeps running). `resume()` continues."""
        self.message = (await self.client.call("PauseSandbox", api.PauseSandboxRequest(name=self.name))).sandbox

    async def resume(self) -> None:
        """Continues a paused sandbox where it stopped."""
        self.message = (await self.client.call("ResumeSandbox", api.ResumeSandboxRequest(name=self.name))).sandbox

    async def refresh(self) -> sandbox_pb2.Sandbox:
        """Asks the server for the sandbox again and returns its message (also kept in `message`)."""
        self.message = (
            await self.client.call("GetSandbox", api.GetSandboxRequest(name=self.name), idempotent=True)
        ).sandbox
        return self.message

    async def get_info(self) -> SandboxInfo:
        """The sandbox as the server sees it now: state, labels, env, times, size, node, address."""
        return SandboxInfo.from_message(await self.refresh())

    async def is_running(self) -> bool:
        """True when the sandbox exists and is RUNNING."""
        try:
            return (await self.refresh()).state == sandbox_pb2.SANDBOX_STATE_RUNNING
        except SandboxError as error:
            if error.code == "NOT_FOUND":
                return False
            raise

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

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.state}>"

    @classmethod
    async def list(
        cls,
        *,
        state: str | None = None,
        labels: dict[str, str] | None = None,
        client: AsyncClient | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """The caller's sandboxes, newest first: only those in `state` (`running`, `paused`, ...) and with all
        of `labels` when given."""
        wanted = None
        if state is not None:
            wanted = STATES.get(state.upper())
            if wanted is None:
                raise InvalidArgumentError(
                    f"unknown state {state!r}; one of {', '.join(s.lower() for s in STATES if s != 'UNSPECIFIED')}",
                    code="INVALID_ARGUMENT",
                )
        active = client or AsyncClient(address, api_key)
        try:
            found = await list_sandboxes(active, labels)
        finally:
            if client is None:
                await active.close()
        return [SandboxInfo.from_message(s) for s in found if wanted is None or s.state == wanted]


# `from microvm_sandbox.aio import Sandbox` reads naturally in async code: `async with Sandbox.create() as sb`.
Sandbox = AsyncSandbox
