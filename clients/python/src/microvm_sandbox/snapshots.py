"""`AsyncSnapshot`: a snapshot bound to a connection, to restore or delete."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from microvm.sandbox.v1 import sandbox_pb2
from microvm_sandbox.errors import SandboxError
from microvm_sandbox.models import SnapshotInfo

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.client import AsyncClient


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
