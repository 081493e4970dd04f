"""E2B's fork and snapshots (services/gateway/e2b/snapshot_routes.py) driven by the unmodified e2b SDK against an
in-process installation (fake VMM): fork into clones that answer as sandboxes of their own, snapshot with a name,
list, create a sandbox from the snapshot by its id, delete it; and the refusals in E2B's shape."""

from __future__ import annotations

import pytest
from e2b import AsyncSandbox, SandboxState

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b import access_token

pytestmark = pytest.mark.timeout(120)


async def test_fork_makes_running_clones_each_with_its_own_token(doors):
    source = await AsyncSandbox.create("base", timeout=120, metadata={"role": "source"})
    clones = []
    try:
        clones = await source.fork(count=2, timeout=300)
        assert len(clones) == 2 and all(isinstance(c, AsyncSandbox) for c in clones)
        ids = {c.sandbox_id for c in clones}
        assert len(ids) == 2 and source.sandbox_id not in ids
        for clone in clones:
            info = await clone.get_info()
            assert info.state == SandboxState.RUNNING and info.metadata["role"] == "source"
            assert (info.end_at - info.started_at).total_seconds() > 200  # the fork's timeout, not the source's
            token = clone.connection_config.sandbox_headers["X-Access-Token"]
            assert access_token.sandbox_scope(token) == clone.sandbox_id
        assert (await source.get_info()).state == SandboxState.RUNNING  # the source goes on
    finally:
        for sandbox in [source, *[c for c in clones if isinstance(c, AsyncSandbox)]]:
            await sandbox.kill()


async def test_snapshot_list_create_from_it_and_delete(doors):
    source = await AsyncSandbox.create("base", timeout=120)
    restored = None
    try:
        snapshot = await source.create_snapshot(name="checkpoint")
        assert snapshot.snapshot_id.startswith("snap-") and snapshot.names == ["checkpoint"]
        listed = await AsyncSandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
        assert [s.snapshot_id for s in listed] == [snapshot.snapshot_id]
        restored = await AsyncSandbox.create(snapshot.snapshot_id, timeout=120, metadata={"from": "snapshot"})
        ours = await doors.alice.stub.GetSandbox(
            api.GetSandboxRequest(name=f"sandboxes/{restored.sandbox_id}"), metadata=doors.alice.metadata, timeout=10
        )
        assert ours.sandbox.source_snapshot == f"snapshots/{snapshot.snapshot_id}"
        assert dict(ours.sandbox.labels) == {"from": "snapshot"}
        assert await AsyncSandbox.delete_snapshot(snapshot.snapshot_id) is True
        assert await AsyncSandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items() == []
    finally:
        await source.kill()
        if restored is not None:
            await restored.kill()


async def test_snapshot_refusals_are_e2b_shapes(doors):
    source = await AsyncSandbox.create("base", timeout=120)
    try:
        status, body = await doors.call("POST", f"/sandboxes/{source.sandbox_id}/snapshots", json={"memory": False})
        assert status == 501 and "filesystem-only" in body["message"]
        status, body = await doors.call("POST", f"/sandboxes/{source.sandbox_id}/fork", json={"count": 0})
        assert status == 400 and body["code"] == 400
        theirs = await doors.call("POST", f"/sandboxes/{source.sandbox_id}/fork", key=doors.bob.key, json={})
        assert theirs[0] == 404
        status, body = await doors.call("DELETE", "/templates/snap-000000000000")
        assert status == 404 and body["code"] == 404
        status, body = await doors.call("DELETE", "/templates/my-template")
        assert status == 404 and "my-template" in body["message"]  # a template, not one of our snapshots
    finally:
        await source.kill()
