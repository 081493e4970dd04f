"""The connection to the gateway (`AsyncClient`: credentials, deadlines, retries) and the calls that need no
sandbox: listing sandboxes, snapshots and templates, getting and deleting snapshots; `templates` builds and manages
templates (microvm_sandbox.templates)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import (
    code_service_pb2_grpc,
    desktop_service_pb2_grpc,
    sandbox_pb2,
    sandbox_service_pb2_grpc,
    template_pb2,
)
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import SandboxError, UnavailableError, from_rpc_error
from microvm_sandbox.events import AsyncEvents
from microvm_sandbox.models import SnapshotInfo
from microvm_sandbox.snapshots import AsyncSnapshot
from microvm_sandbox.templates import AsyncTemplates
from microvm_sandbox.transfer import CHANNEL_OPTIONS
from microvm_sandbox.webhooks import AsyncWebhooks

if TYPE_CHECKING:
    from microvm_sandbox.sandbox_metrics import SandboxUsage

DEFAULT_ADDRESS = "127.0.0.1:50051"
RETRIES = 3


def default_api_key() -> str:
    """$MVM_API_KEY, else the admin key `make up` wrote into the state dir ($MVM_STATE_DIR or ~/.microvm)."""
    if key := os.environ.get("MVM_API_KEY"):
        return key.strip()
    path = Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm") / "admin.key"
    try:
        return path.read_text().strip()
    except OSError:
        raise SandboxError(
            f"no API key: pass api_key=, set MVM_API_KEY, or run `make up` (writes {path})", code="UNAUTHENTICATED"
        ) from None


def sandbox_name(sandbox_id: str) -> str:
    """`sandboxes/ID` for an id or a name."""
    return sandbox_id if sandbox_id.startswith("sandboxes/") else f"sandboxes/{sandbox_id}"


def snapshot_name(snapshot: SnapshotInfo | str) -> str:
    """`snapshots/ID` for a snapshot, an id or a name."""
    if isinstance(snapshot, SnapshotInfo):
        return snapshot.name
    return snapshot if snapshot.startswith("snapshots/") else f"snapshots/{snapshot}"


class AsyncClient:
    """A connection to the gateway: address, credentials, a default deadline per call, and retries for
    idempotent calls. One client serves any number of sandboxes; close it (or use `async with`) when done.

    `address` defaults to $MVM_GATEWAY or 127.0.0.1:50051, `api_key` to $MVM_API_KEY or the state dir's
    admin key; `timeout` is the deadline of each unary call in seconds."""

    def __init__(self, address: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.address = address or os.environ.get("MVM_GATEWAY", DEFAULT_ADDRESS)
        self.metadata = (("authorization", f"Bearer {api_key or default_api_key()}"),)
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(
            self.address,
            options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
            + CHANNEL_OPTIONS,  # a download holds at most 2 MiB in flight (microvm_sandbox.transfer)
        )
        self.stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]
        # The gateway serves the CodeService (run_code, code contexts) on the same address.
        self.code_stub = code_service_pb2_grpc.CodeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        # And the DesktopService (`sandbox.desktop`: microvm_sandbox.desktop).
        self.desktop_stub = desktop_service_pb2_grpc.DesktopServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def call(
        self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None, stub: Any = None
    ) -> Any:
        """`method(request)` on the SandboxService (or on `stub`, e.g. the admin NodeService); an idempotent
        call is retried on UNAVAILABLE (3 attempts, backing off)."""
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

    async def list_sandboxes(self, label_filter: dict[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
        """Every sandbox of the caller's tenant (all pages), newest first, with all `label_filter` labels."""
        return await list_sandboxes(self, label_filter)

    async def list_snapshots(self, source_sandbox: str = "") -> list[sandbox_pb2.Snapshot]:
        """Every snapshot of the caller's tenant (all pages), oldest first; only `source_sandbox`'s if given."""
        return await list_snapshots(self, source_sandbox)

    async def get_snapshot(self, snapshot: SnapshotInfo | str) -> AsyncSnapshot:
        """One snapshot by id or name. SnapshotNotFound when it does not exist."""
        reply = await self.call("GetSnapshot", api.GetSnapshotRequest(name=snapshot_name(snapshot)), idempotent=True)
        return AsyncSnapshot.bound_to(reply.snapshot, self)

    async def delete_snapshot(self, snapshot: SnapshotInfo | str) -> None:
        """Deletes a snapshot (sandboxes restored from it keep running). SnapshotNotFound when it is gone."""
        await self.call("DeleteSnapshot", api.DeleteSnapshotRequest(name=snapshot_name(snapshot)))

    async def list_templates(self) -> list[template_pb2.Template]:
        """The templates sandboxes can be created from (all pages), as the nodes report them: which nodes have the
        image built, whether a create restores a booted guest (`warm`), the root filesystem's size."""
        found: list[template_pb2.Template] = []
        token = ""
        while True:
            request = api.ListTemplatesRequest(page_size=1000, page_token=token)
            reply = await self.call("ListTemplates", request, idempotent=True)
            found += reply.templates
            token = reply.next_page_token
            if not token:
                return found

    async def list_metrics(self, labels: dict[str, str] | None = None) -> list[SandboxUsage]:
        """The newest resource sample of each of your running sandboxes (with all `labels`)."""
        from microvm_sandbox.sandbox_metrics import list_usage

        return await list_usage(self, labels)

    @property
    def templates(self) -> AsyncTemplates:
        """Templates: build (from a `Template`), watch builds, list, get, create, update, delete
        (microvm_sandbox.templates)."""
        return AsyncTemplates(self)

    @property
    def events(self) -> AsyncEvents:
        """Your sandboxes' lifecycle events as they happen, resumable (microvm_sandbox.events)."""
        return AsyncEvents(self)

    @property
    def webhooks(self) -> AsyncWebhooks:
        """Webhooks that POST your sandboxes' events to a URL, and their deliveries (microvm_sandbox.webhooks)."""
        return AsyncWebhooks(self)

    async def close(self) -> None:
        """Closes the connection; calls in flight are cancelled."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def list_sandboxes(client: AsyncClient, label_filter: dict[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
    """Every sandbox of the caller's tenant (all pages), newest first, with all labels of `label_filter`."""
    query = " ".join(f"labels.{k}={v}" for k, v in (label_filter or {}).items())
    found: list[sandbox_pb2.Sandbox] = []
    token = ""
    while True:
        request = api.ListSandboxesRequest(filter=query, page_size=1000, page_token=token)
        reply = await client.call("ListSandboxes", request, idempotent=True)
        found += reply.sandboxes
        token = reply.next_page_token
        if not token:
            return found


async def list_snapshots(client: AsyncClient, source_sandbox: str = "") -> list[sandbox_pb2.Snapshot]:
    """Every snapshot of the caller's tenant (all pages), oldest first; only `source_sandbox`'s when given."""
    name = sandbox_name(source_sandbox) if source_sandbox else ""
    found: list[sandbox_pb2.Snapshot] = []
    token = ""
    while True:
        request = api.ListSnapshotsRequest(source_sandbox=name, page_size=1000, page_token=token)
        reply = await client.call("ListSnapshots", request, idempotent=True)
        found += reply.snapshots
        token = reply.next_page_token
        if not token:
            return found
