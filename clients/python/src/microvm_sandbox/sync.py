"""The synchronous SDK: the async one run on a private event loop, so both behave the same.

    with Sandbox.create(template="default", envs={"MODE": "test"}) as sb:
        print(sb.exec(["echo", "hi"]).stdout)

`Sandbox` mirrors `AsyncSandbox` method for method (same arguments, same errors), without `await`.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from microvm.sandbox.v1 import sandbox_pb2, template_pb2
from microvm_sandbox.aio import AsyncClient, AsyncSandbox, list_sandboxes, list_snapshots
from microvm_sandbox.code_sync import CodeMethods
from microvm_sandbox.desktop_sync import DesktopMethods
from microvm_sandbox.events_sync import Events, Webhooks
from microvm_sandbox.exec_stream import ExecStream
from microvm_sandbox.files_sync import Files
from microvm_sandbox.models import ConsoleOutput, FileEntry, SandboxInfo, SnapshotInfo
from microvm_sandbox.port_forward_sync import PortForwardMethods
from microvm_sandbox.sandbox_exec import ExecMethods
from microvm_sandbox.sandbox_metrics import SandboxUsage, list_usage
from microvm_sandbox.sandbox_metrics_sync import MetricsMethods
from microvm_sandbox.sandbox_network import NetworkMethods
from microvm_sandbox.snapshots import Snapshot, SnapshotMethods
from microvm_sandbox.sync_loop import Loop
from microvm_sandbox.templates_sync import Templates

__all__ = ["Client", "ExecStream", "Sandbox", "Snapshot"]

T = TypeVar("T")


_Loop = Loop  # the name this module has always used


class Client:
    """A connection to the gateway (see `AsyncClient`): pass it as `client=` to share one connection between
    sandboxes. `address` defaults to $MVM_GATEWAY or 127.0.0.1:50051, `api_key` to $MVM_API_KEY or the state
    dir's admin key, `timeout` is each call's deadline in seconds."""

    def __init__(self, address: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        self._loop = Loop.shared()

        async def make() -> AsyncClient:
            return AsyncClient(address, api_key, timeout)

        self.aio = self._loop.run(make())

    def list_sandboxes(self, label_filter: dict[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
        """Every sandbox of the caller's tenant, newest first, with all labels of `label_filter` (messages)."""
        return self._loop.run(list_sandboxes(self.aio, label_filter))

    def list_snapshots(self, source_sandbox: str = "") -> list[sandbox_pb2.Snapshot]:
        """Every snapshot of the caller's tenant, oldest first; only `source_sandbox`'s when given (messages)."""
        return self._loop.run(list_snapshots(self.aio, source_sandbox))

    def get_snapshot(self, snapshot: SnapshotInfo | str) -> Snapshot:
        """One snapshot by id or name. SnapshotNotFound when it does not exist."""
        return Snapshot.wrap(self._loop.run(self.aio.get_snapshot(snapshot)))

    def delete_snapshot(self, snapshot: SnapshotInfo | str) -> None:
        """Deletes a snapshot (sandboxes restored from it keep running). SnapshotNotFound when it is gone."""
        self._loop.run(self.aio.delete_snapshot(snapshot))

    def list_templates(self) -> list[template_pb2.Template]:
        """The templates sandboxes can be created from, as the nodes report them (messages)."""
        return self._loop.run(self.aio.list_templates())

    def list_metrics(self, labels: dict[str, str] | None = None) -> list[SandboxUsage]:
        """The newest resource sample of each of your running sandboxes (with all `labels`)."""
        return self._loop.run(list_usage(self.aio, labels))

    @property
    def templates(self) -> Templates:
        """Templates: build, watch builds, list, get, create, update, delete (`AsyncClient.templates`, sync)."""
        return Templates(self.aio.templates, self._loop.run)

    @property
    def events(self) -> Events:
        """Your sandboxes' lifecycle events as they happen (`AsyncClient.events`, sync)."""
        return Events(self.aio.events, self._loop.run)

    @property
    def webhooks(self) -> Webhooks:
        """Webhooks and their deliveries (`AsyncClient.webhooks`, sync)."""
        return Webhooks(self.aio.webhooks, self._loop.run)

    def call(self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None) -> Any:
        """The low-level call: `method(request)` on the SandboxService, its response message (errors mapped
        and idempotent calls retried as everywhere in the SDK)."""
        return self._loop.run(self.aio.call(method, request, idempotent=idempotent, timeout=timeout))

    def close(self) -> None:
        """Closes the connection."""
        self._loop.run(self.aio.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _client(client: Client | None) -> AsyncClient | None:
    return client.aio if client else None


class Sandbox(
    ExecMethods, CodeMethods, SnapshotMethods, NetworkMethods, PortForwardMethods, DesktopMethods, MetricsMethods
):
    """A running sandbox: a disposable Linux microVM (the sync twin of `AsyncSandbox`). Make one with
    `create()`, `connect()` or `restore()`; `kill()` (or leaving `with`) deletes it."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self.aio = inner
        self._loop = Loop.shared()

    @property
    def name(self) -> str:
        """The resource name, `sandboxes/{id}`."""
        return self.aio.name

    @property
    def id(self) -> str:
        """The sandbox id (what `mvm` and `connect()` take)."""
        return self.aio.id

    @property
    def state(self) -> str:
        """The state when last seen (`RUNNING`, `PAUSED`, ...)."""
        return self.aio.state

    @property
    def ip_address(self) -> str:
        """The guest's address on its node's bridge (empty where networking is off)."""
        return self.aio.ip_address

    @property
    def source_snapshot(self) -> str:
        """The snapshot id this sandbox was restored or forked from; empty for a fresh one."""
        return self.aio.source_snapshot

    @property
    def template_build(self) -> str:
        """The build of its template it started from, `templates/T/builds/B`; empty for a built-in template."""
        return self.aio.template_build

    @property
    def message(self) -> sandbox_pb2.Sandbox:
        """The server's last description of the sandbox."""
        return self.aio.message

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
        client: Client | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """A new sandbox, RUNNING when this returns; `with` it to kill it at the end. Arguments as in
        `AsyncSandbox.create`: template, timeout (seconds), vcpus, memory_mib, labels, envs (environment of
        every command), egress/allow, node_selector, sandbox_id, and client or address/api_key."""

        async def make() -> AsyncSandbox:
            return await AsyncSandbox.create(
                template,
                timeout=timeout,
                vcpus=vcpus or 0,
                memory_mib=memory_mib or 0,
                labels=labels,
                envs=envs,
                egress=egress,
                allow=allow,
                node_selector=node_selector,
                sandbox_id=sandbox_id,
                client=_client(client),
                address=address,
                api_key=api_key,
            )

        return cls(Loop.shared().run(make()))

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        client: Client | None = None,
        *,
        resume: bool = True,
        address: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """An existing sandbox by id; a PAUSED one is resumed first (resume=False leaves it paused).
        SandboxNotFound when it does not exist."""
        inner = AsyncSandbox.connect(sandbox_id, _client(client), resume=resume, address=address, api_key=api_key)
        return cls(Loop.shared().run(inner))

    @classmethod
    def restore(
        cls,
        snapshot: SnapshotInfo | str,
        client: Client | None = None,
        *,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """A new sandbox from a snapshot (object, id or name), as `AsyncSandbox.restore` makes it."""
        if isinstance(snapshot, Snapshot) and snapshot._inner is not None and client is None and address is None:
            return snapshot.restore(
                timeout=timeout, labels=labels, egress=egress, allow=allow, node_selector=node_selector
            )
        inner = AsyncSandbox.restore(
            snapshot,
            _client(client),
            timeout=timeout,
            labels=labels,
            egress=egress,
            allow=allow,
            node_selector=node_selector,
            address=address,
            api_key=api_key,
        )
        return cls(Loop.shared().run(inner))

    # --- files ----------------------------------------------------------------------------------------
    @property
    def files(self) -> Files:
        """The sandbox's filesystem (see `microvm_sandbox.files`): read, write, list, watch_dir, upload..."""
        return Files(self.aio.files, self._loop.run)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True) -> None:
        """Writes `data` (str is UTF-8 encoded) to the absolute `path`, replacing the file."""
        self._loop.run(self.aio.write(path, data, mode=mode, make_parents=make_parents))

    def read(self, path: str) -> bytes:
        """The whole file at the absolute `path`. NotFoundError when it does not exist."""
        return self._loop.run(self.aio.read(path))

    def upload(self, local: str | Path, remote: str) -> None:
        """Copies the local file or directory `local` to `remote` in the sandbox, streaming."""
        self._loop.run(self.aio.upload(local, remote))

    def download(self, remote: str, local: str | Path) -> None:
        """Copies the file or directory `remote` in the sandbox to `local`, streaming."""
        self._loop.run(self.aio.download(remote, local))

    def ls(self, path: str = "/") -> builtins.list[FileEntry]:
        """The entries of the directory `path`."""
        return self._loop.run(self.aio.ls(path))

    def read_console_log(self, *, tail_bytes: int = 0, offset: int = 0, length: int = 0) -> ConsoleOutput:
        """The sandbox's serial console: the newest `tail_bytes`, or `length` bytes from `offset`."""
        return self._loop.run(self.aio.read_console_log(tail_bytes=tail_bytes, offset=offset, length=length))

    # --- lifecycle ------------------------------------------------------------------------------------
    def set_timeout(self, seconds: float) -> None:
        """The sandbox is now deleted `seconds` from now."""
        self._loop.run(self.aio.set_timeout(seconds))

    def set_labels(self, labels: dict[str, str]) -> None:
        """Replaces the sandbox's labels."""
        self._loop.run(self.aio.set_labels(labels))

    def pause(self) -> None:
        """Stops the guest's vCPUs, keeping its memory. `resume()` continues."""
        self._loop.run(self.aio.pause())

    def resume(self) -> None:
        """Continues a paused sandbox where it stopped."""
        self._loop.run(self.aio.resume())

    def refresh(self) -> sandbox_pb2.Sandbox:
        """Asks the server for the sandbox again and returns its message."""
        return self._loop.run(self.aio.refresh())

    def get_info(self) -> SandboxInfo:
        """The sandbox as the server sees it now: state, labels, env, times, size, node, address."""
        return self._loop.run(self.aio.get_info())

    def is_running(self) -> bool:
        """True when the sandbox exists and is RUNNING."""
        return self._loop.run(self.aio.is_running())

    def kill(self) -> None:
        """Deletes the sandbox and everything it holds. A second kill is a no-op."""
        self._loop.run(self.aio.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.state}>"

    @classmethod
    def list(
        cls,
        *,
        state: str | None = None,
        labels: dict[str, str] | None = None,
        client: Client | None = None,
        address: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """The caller's sandboxes, newest first: only those in `state` (`running`, `paused`, ...) and with all
        of `labels` when given."""
        inner = AsyncSandbox.list(state=state, labels=labels, client=_client(client), address=address, api_key=api_key)
        return Loop.shared().run(inner)
