"""E2B's fork and snapshot routes on the control plane (control_plane.py), translated onto ForkSandbox,
CreateSnapshot, ListSnapshots, DeleteSnapshot and RestoreSnapshot.

E2B's snapshots are templates: the SDK creates a sandbox from one by passing its id as `templateID` and deletes one
with `DELETE /templates/{id}`. Our snapshot ids (`snap-…`) play that part: a create whose template is one restores
that snapshot, and that delete deletes it. A snapshot's E2B name is its label `name`. Snapshots keep memory, so a
filesystem-only one (`memory: false`) is refused by name rather than taken as a full one silently.
"""

from __future__ import annotations

from aiohttp import web

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b import shapes
from services.gateway.e2b.shapes import PREFIX, E2bError

SNAPSHOT_PREFIX = "snap-"  # our snapshot ids (services/gateway/snapshots.py)
NAME_LABEL = "name"


def is_snapshot(template_id: str) -> bool:
    return template_id.startswith(SNAPSHOT_PREFIX)


def snapshot_info(snapshot: sandbox_pb2.Snapshot) -> dict:
    name = snapshot.labels.get(NAME_LABEL, "")
    return {"snapshotID": snapshot.name.removeprefix("snapshots/"), "names": [name] if name else []}


class SnapshotRoutes:
    def __init__(self, plane) -> None:
        self.plane = plane  # ControlPlane: credentials, body parsing, the stub, tokens

    def add(self, app: web.Application) -> None:
        app.router.add_route("POST", "/sandboxes/{id}/fork", self.fork)
        app.router.add_route("POST", "/sandboxes/{id}/snapshots", self.create_snapshot)
        app.router.add_route("GET", "/snapshots", self.list_snapshots)

    async def restore(self, body: dict, metadata, timeout: int) -> web.Response:
        """A create whose `templateID` is one of our snapshots: RestoreSnapshot with its labels and timeout."""
        if body.get("envVars"):
            raise E2bError(501, "env vars of a sandbox created from a snapshot are not supported (it keeps its own)")
        sandbox = sandbox_pb2.Sandbox(labels=shapes.strings(body.get("metadata"), "metadata"))
        sandbox.timeout.FromSeconds(timeout)
        reply = await self.plane.stub().RestoreSnapshot(
            api.RestoreSnapshotRequest(snapshot=f"snapshots/{body['templateID']}", sandbox=sandbox),
            metadata=metadata,
            timeout=600,
        )
        return await self.plane.with_token(reply.sandbox, metadata, 201)

    async def fork(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        body = await self.plane.body(request)
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 64:
            raise E2bError(400, "count must be 1-64")
        timeout = shapes.seconds(body["timeout"], "timeout") if "timeout" in body else None
        reply = await self.plane.stub().ForkSandbox(
            api.ForkSandboxRequest(name=PREFIX + request.match_info["id"], count=count), metadata=metadata, timeout=600
        )
        results = []
        for clone in reply.sandboxes:
            if timeout is not None:
                clone = await self.plane.set_timeout_of(clone.name, timeout, metadata)
            token = await self.plane.issue(metadata, shapes.sandbox_id(clone))
            results.append({"sandbox": shapes.created(clone, token, self.plane.settings.e2b_domain)})
        return web.json_response(results, status=201)

    async def create_snapshot(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        body = await self.plane.body(request)
        if body.get("memory") is False:
            raise E2bError(501, "filesystem-only snapshots (memory: false) are not supported by this backend")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise E2bError(400, "name must be a string")
        labels = {NAME_LABEL: name} if name else {}
        reply = await self.plane.stub().CreateSnapshot(
            api.CreateSnapshotRequest(sandbox=PREFIX + request.match_info["id"], labels=labels),
            metadata=metadata,
            timeout=600,
        )
        return web.json_response(snapshot_info(reply.snapshot), status=201)

    async def list_snapshots(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise E2bError(400, "limit must be a number") from None
        source = PREFIX + query["sandboxID"] if query.get("sandboxID") else ""
        reply = await self.plane.stub().ListSnapshots(
            api.ListSnapshotsRequest(source_sandbox=source, page_size=limit, page_token=query.get("nextToken", "")),
            metadata=metadata,
            timeout=30,
        )
        name = query.get("name", "")
        found = [snapshot_info(s) for s in reply.snapshots if not name or s.labels.get(NAME_LABEL) == name]
        headers = {"x-next-token": reply.next_page_token} if reply.next_page_token else {}
        return web.json_response(found, headers=headers)

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        snapshot = request.match_info["template"]  # `DELETE /templates/{id}` of a `snap-…` id (template_routes.py)
        await self.plane.stub().DeleteSnapshot(
            api.DeleteSnapshotRequest(name=f"snapshots/{snapshot}"), metadata=metadata, timeout=60
        )
        return web.Response(status=204)
