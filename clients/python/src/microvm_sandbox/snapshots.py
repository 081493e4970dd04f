"""Snapshots: `AsyncSnapshot` and `Snapshot` (sync), bound to a connection, to restore or delete; and the sandbox
methods that make them and forks (`AsyncSnapshotMethods`, `SnapshotMethods`, mixed into the sandbox classes)."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import SandboxError
from microvm_sandbox.exec_stream import duration
from microvm_sandbox.models import SnapshotInfo
from microvm_sandbox.sync_loop import Loop

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.client import AsyncClient
    from microvm_sandbox.sync import Sandbox


class AsyncSnapshot(SnapshotInfo):
    """A snapshot you can `restore()` into new sandboxes or `delete()`."""

    _client: AsyncClient | None = None

    @classmethod
    def bound_to(cls, message: sandbox_pb2.Snapshot, client: AsyncClient | None) -> AsyncSnapshot:
        """The snapshot of a Snapshot message, bound to `client`."""
        snapshot = cls.from_message(message)
        snapshot._client = client
        return snapshot

    def _bound(self, client: AsyncClient | None) -> AsyncClient:
        active = client or self._client
        if active is None:
            raise SandboxError("this snapshot is bound to no client: pass client=", code="FAILED_PRECONDITION")
        return active

    async def delete(self, client: AsyncClient | None = None) -> None:
        """Deletes the snapshot; sandboxes restored from it keep running. SnapshotNotFound when it is gone."""
        await self._bound(client).delete_snapshot(self.name)

    async def restore(
        self,
        client: AsyncClient | None = None,
        *,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
    ) -> AsyncSandbox:
        """A new sandbox from this snapshot, as `AsyncSandbox.restore(snapshot, ...)` makes it."""
        from microvm_sandbox.aio import AsyncSandbox  # the sandbox module imports this one

        return await AsyncSandbox.restore(
            self,
            self._bound(client),
            timeout=timeout,
            labels=labels,
            egress=egress,
            allow=allow,
            node_selector=node_selector,
        )


class Snapshot(SnapshotInfo):
    """A snapshot you can `restore()` into new sandboxes or `delete()`."""

    _inner: AsyncSnapshot | None = None

    @classmethod
    def wrap(cls, inner: AsyncSnapshot) -> Snapshot:
        """The sync view of an AsyncSnapshot."""
        snapshot = cls(**{name: getattr(inner, name) for name in SnapshotInfo.__dataclass_fields__})
        snapshot._inner = inner
        return snapshot

    def _async(self) -> AsyncSnapshot:
        if self._inner is None:
            raise SandboxError("this snapshot is bound to no client", code="FAILED_PRECONDITION")
        return self._inner

    def delete(self) -> None:
        """Deletes the snapshot; sandboxes restored from it keep running. SnapshotNotFound when it is gone."""
        Loop.shared().run(self._async().delete())

    def restore(
        self,
        *,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        egress: str | None = None,
        allow: Sequence[str] = (),
        node_selector: dict[str, str] | None = None,
    ) -> Sandbox:
        """A new sandbox from this snapshot, as `Sandbox.restore(snapshot, ...)` makes it."""
        from microvm_sandbox.sync import Sandbox  # the sandbox module imports this one

        inner = self._async().restore(
            timeout=timeout, labels=labels, egress=egress, allow=allow, node_selector=node_selector
        )
        return Sandbox(Loop.shared().run(inner))


class AsyncSnapshotMethods:
    """`AsyncSandbox`'s snapshot and fork methods (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    async def snapshot(self, labels: dict[str, str] | None = None, ttl: float | None = None) -> AsyncSnapshot:
        """Freezes memory, processes and disk into a snapshot (the sandbox keeps running). It is kept until
        deleted (`snapshot.delete()`), or `ttl` seconds when given; it counts against the snapshot quota."""
        request = api.CreateSnapshotRequest(sandbox=self.name, labels=labels or {})
        if ttl:
            request.ttl.CopyFrom(duration(ttl))
        reply = await self.client.call("CreateSnapshot", request, timeout=600)
        return AsyncSnapshot.bound_to(reply.snapshot, self.client)

    async def list_snapshots(self) -> builtins.list[AsyncSnapshot]:
        """This sandbox's snapshots, oldest first."""
        from microvm_sandbox.client import list_snapshots  # the client module imports this one

        return [AsyncSnapshot.bound_to(s, self.client) for s in await list_snapshots(self.client, self.name)]

    async def delete_snapshot(self, snapshot: SnapshotInfo | str) -> None:
        """Deletes a snapshot (object, id or name) with this sandbox's connection."""
        await self.client.delete_snapshot(snapshot)

    async def fork(
        self, count: int = 1, *, labels: dict[str, str] | None = None, keep_snapshot: bool = False
    ) -> builtins.list[AsyncSandbox]:
        """`count` (1..64) independent running copies of this sandbox, each with its own identity, address and
        randomness, the source's labels (plus `labels`) and environment. The snapshot they are made from is
        deleted once they run unless keep_snapshot=True (then `clone.source_snapshot` names it). All or
        nothing: on failure no clone is left."""
        from microvm_sandbox.aio import AsyncSandbox  # the sandbox module imports this one

        request = api.ForkSandboxRequest(name=self.name, count=count, labels=labels or {})
        if "keep_snapshot" in api.ForkSandboxRequest.DESCRIPTOR.fields_by_name:
            request.keep_snapshot = keep_snapshot
        reply = await self.client.call("ForkSandbox", request, timeout=900)
        return [AsyncSandbox(self.client, message) for message in reply.sandboxes]


class SnapshotMethods:
    """`Sandbox`'s snapshot and fork methods (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    def snapshot(self, labels: dict[str, str] | None = None, ttl: float | None = None) -> Snapshot:
        """Freezes memory, processes and disk into a snapshot, kept until deleted or `ttl` seconds."""
        return Snapshot.wrap(self._loop.run(self.aio.snapshot(labels, ttl)))

    def list_snapshots(self) -> builtins.list[Snapshot]:
        """This sandbox's snapshots, oldest first."""
        return [Snapshot.wrap(s) for s in self._loop.run(self.aio.list_snapshots())]

    def delete_snapshot(self, snapshot: SnapshotInfo | str) -> None:
        """Deletes a snapshot (object, id or name) with this sandbox's connection."""
        self._loop.run(self.aio.delete_snapshot(snapshot))

    def fork(
        self, count: int = 1, *, labels: dict[str, str] | None = None, keep_snapshot: bool = False
    ) -> builtins.list[Sandbox]:
        """`count` independent running copies (see `AsyncSandbox.fork`); the snapshot they come from is
        deleted unless keep_snapshot=True."""
        from microvm_sandbox.sync import Sandbox  # the sandbox module imports this one

        clones = self._loop.run(self.aio.fork(count, labels=labels, keep_snapshot=keep_snapshot))
        return [Sandbox(clone) for clone in clones]
