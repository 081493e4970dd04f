"""WatchEvents (services/gateway/events.py): a tenant's sandbox lifecycle as a resumable stream, on a whole installation
(fake VMM) with its own operator tenant; over gRPC and over HTTP (NDJSON and server-sent events)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import auth_pb2 as auth_types
from services.common.errors import error_info
from services.common.records import VMS, Records
from services.gateway.records import sandbox_key
from tests.event_watch import (
    CREATED,
    DELETED,
    EXPIRED,
    FAILED,
    RESUMED,
    STARTED,
    EventWatch,
    kind,
)
from tests.inprocess import InProcessNode, etcd_client_for, fake_image_root, start_installation, tenant_caller

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def installation(etcd_server):
    """As the shared one, with an operator tenant of its own (who may watch other tenants)."""
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-events-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    node.settings["gateway"] = {"operator_tenants": [f"ev-ops-{node.node}"]}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture
async def caller(installation):
    tenant = f"ev-{uuid.uuid4().hex[:8]}"
    caller = await tenant_caller(installation, tenant)
    caller.tenant = tenant
    yield caller
    await caller.channel.close()


async def create(caller, **fields) -> sandbox_pb2.Sandbox:
    request = api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(**fields))
    return (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox


async def delete(caller, name: str) -> None:
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=caller.metadata, timeout=60)


def revision_of(event) -> tuple[int, int]:
    revision, _, index = event.cursor.partition(".")
    return int(revision), int(index)


async def test_create_and_delete_come_in_order_each_with_a_cursor(caller):
    async with EventWatch(caller) as watch:
        assert watch.first.caught_up and watch.first.cursor
        sandbox = await create(caller, labels={"team": "a"})
        await delete(caller, sandbox.name)
        seen = await watch.events_until(sandbox.name, DELETED)
    assert [kind(e) for e in seen] == ["CREATED", "STARTED", "DELETED"]
    assert all(e.sandbox == sandbox.name and e.labels == {"team": "a"} for e in seen)
    assert all(e.tenant == seen[0].tenant and e.template == "default" for e in seen)
    assert seen[1].state == sandbox_pb2.SANDBOX_STATE_RUNNING and seen[1].node == sandbox.node
    assert seen[2].state == sandbox_pb2.SANDBOX_STATE_UNSPECIFIED
    assert [revision_of(e) for e in seen] == sorted(revision_of(e) for e in seen)
    assert len({e.cursor for e in seen}) == 3 and all(e.time.seconds for e in seen)


async def test_pause_resume_snapshot_and_expiry_are_events(caller):
    async with EventWatch(caller) as watch:
        sandbox = await create(caller, timeout=duration_pb2.Duration(seconds=4))
        md = caller.metadata
        await caller.stub.PauseSandbox(api.PauseSandboxRequest(name=sandbox.name), metadata=md, timeout=30)
        await caller.stub.ResumeSandbox(api.ResumeSandboxRequest(name=sandbox.name), metadata=md, timeout=30)
        snapshot = (
            await caller.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=sandbox.name), metadata=md, timeout=60)
        ).snapshot
        seen = await watch.events_until(sandbox.name, EXPIRED, timeout=90)
    assert [kind(e) for e in seen] == ["CREATED", "STARTED", "PAUSED", "RESUMED", "SNAPSHOTTED", "EXPIRED"]
    assert seen[2].state == sandbox_pb2.SANDBOX_STATE_PAUSED and seen[3].state == sandbox_pb2.SANDBOX_STATE_RUNNING
    assert seen[4].snapshot == snapshot.name
    await caller.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=md, timeout=30)


async def test_a_vm_that_dies_is_a_failed_event_with_the_reason(installation, caller):
    async with EventWatch(caller, types=[FAILED, DELETED]) as watch:
        sandbox = await create(caller)
        records = Records(etcd_client_for(installation.etcd_endpoint))
        vm_id = sandbox_key(caller.tenant, sandbox.name.removeprefix("sandboxes/"))
        vm = (await records.get(VMS, sandbox.node, vm_id)).message
        os.kill(vm.pid, signal.SIGKILL)  # the fake VMM's "VM" is a host process
        failed = await watch.event(60)
        await delete(caller, sandbox.name)
        deleted = await watch.event(60)
    assert (kind(failed), failed.sandbox, failed.state) == ("FAILED", sandbox.name, sandbox_pb2.SANDBOX_STATE_FAILED)
    assert failed.message
    assert (kind(deleted), deleted.sandbox) == ("DELETED", sandbox.name)


async def test_resuming_from_a_cursor_after_a_disconnect_misses_nothing_and_repeats_nothing(caller):
    async with EventWatch(caller) as reference:
        start = reference.first.cursor
        first = await create(caller)
        async with EventWatch(caller, cursor=start) as interrupted:
            got = await interrupted.events_until(first.name, STARTED)
        # Disconnected: what happens now is only in the history.
        second = await create(caller)
        await caller.stub.PauseSandbox(api.PauseSandboxRequest(name=first.name), metadata=caller.metadata, timeout=30)
        await delete(caller, second.name)
        async with EventWatch(caller, cursor=got[-1].cursor) as resumed:
            assert not resumed.first.caught_up or resumed.first.cursor == got[-1].cursor
            await caller.stub.ResumeSandbox(
                api.ResumeSandboxRequest(name=first.name), metadata=caller.metadata, timeout=30
            )
            rest = await resumed.events_until(first.name, RESUMED)
        everything = await reference.events_until(first.name, RESUMED)
        # From the very first cursor: the same events again, in the same order, with the same cursors.
        async with EventWatch(caller, cursor=start) as replay:
            again = await replay.events_until(first.name, RESUMED)
    assert [e.cursor for e in got + rest] == [e.cursor for e in everything] == [e.cursor for e in again]
    assert [kind(e) for e in everything] == ["CREATED", "STARTED", "CREATED", "STARTED", "PAUSED", "DELETED", "RESUMED"]
    await delete(caller, first.name)


async def test_a_tenant_sees_only_its_own_sandboxes_and_an_operator_may_watch_it(installation, caller):
    other = await tenant_caller(installation, f"ev-other-{uuid.uuid4().hex[:6]}")
    operator = await tenant_caller(installation, f"ev-ops-{installation.node}", role=auth_types.ROLE_ADMIN)
    async with EventWatch(caller) as mine, EventWatch(other) as theirs:
        their_box = await create(other)
        async with EventWatch(operator, tenant=(await theirs.events_until(their_box.name, STARTED))[0].tenant) as op:
            box = await create(caller)
            await delete(other, their_box.name)
            watched = await op.events_until(their_box.name, DELETED)
        seen_by_me = await mine.events_until(box.name, STARTED)
    assert {e.sandbox for e in seen_by_me} == {box.name}
    assert [kind(e) for e in watched] == ["DELETED"] and watched[0].sandbox == their_box.name
    # Another tenant's events are not the caller's to watch, by name or all at once.
    for tenant in (watched[0].tenant, "*"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with EventWatch(caller, tenant=tenant):
                pass
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await delete(caller, box.name)
    await other.channel.close()
    await operator.channel.close()


async def test_labels_and_types_filter_the_events(caller):
    async with EventWatch(caller, labels={"team": "b"}, types=[CREATED, DELETED]) as watch:
        elsewhere = await create(caller, labels={"team": "c"})
        wanted = await create(caller, labels={"team": "b", "tier": "x"})
        for name in (elsewhere.name, wanted.name):
            await delete(caller, name)
        seen = await watch.events_until(wanted.name, DELETED)
        assert await watch.quiet(0.5) == []
    assert [(kind(e), e.sandbox) for e in seen] == [("CREATED", wanted.name), ("DELETED", wanted.name)]


@pytest.mark.parametrize(
    "request_fields, code, reason",
    [
        ({"cursor": "yesterday"}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_CURSOR"),
        ({"cursor": "999999999999"}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_CURSOR"),
        ({"types": [42]}, grpc.StatusCode.INVALID_ARGUMENT, "BAD_EVENT_TYPE"),
        ({"labels": {"Bad Key": "x"}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
async def test_bad_watch_requests_get_clear_statuses(caller, request_fields, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with EventWatch(caller, **request_fields):
            pass
    assert refused.value.code() == code
    assert error_info(refused.value).reason == reason


async def test_a_compacted_cursor_is_out_of_range_and_says_what_to_do(installation, caller):
    async with EventWatch(caller) as watch:
        old = watch.first.cursor
        sandbox = await create(caller)
        await watch.events_until(sandbox.name, STARTED)
    etcd = etcd_client_for(installation.etcd_endpoint)
    head = (await etcd.get_prefix(b"/microvm/sandboxes/")).header.revision
    await etcd.compact(head)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with EventWatch(caller, cursor=old):
            pass
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(refused.value).reason == "EVENTS_COMPACTED"
    assert "ListSandboxes" in refused.value.details() and "without a cursor" in refused.value.details()
    await delete(caller, sandbox.name)


async def test_http_streams_events_as_ndjson_and_as_server_sent_events(installation, caller):
    base = f"http://{installation.settings['gateway']['http_listen']}"
    headers = {"Authorization": f"Bearer {caller.key}"}
    async with aiohttp.ClientSession(base, headers=headers) as http:
        async with (
            http.post("/v1/events:watch", json={"types": ["SANDBOX_EVENT_TYPE_CREATED"]}) as ndjson,
            http.post("/v1/events:watch", json={}, headers={"Accept": "text/event-stream"}) as sse,
        ):
            assert ndjson.status == 200 and ndjson.headers["Content-Type"] == "application/x-ndjson"
            assert sse.headers["Content-Type"] == "text/event-stream"
            assert "progress" in json.loads(await ndjson.content.readline())
            assert (await sse.content.readline()).startswith(b"data: ")
            sandbox = await create(caller)
            created = json.loads(await asyncio.wait_for(ndjson.content.readline(), 30))["event"]
            lines = []
            while len(lines) < 2:
                line = (await asyncio.wait_for(sse.content.readline(), 30)).strip()
                if line.startswith(b"data: ") and b'"event"' in line:
                    lines.append(json.loads(line[6:])["event"])
    assert created["type"] == "SANDBOX_EVENT_TYPE_CREATED" and created["sandbox"] == sandbox.name
    assert [e["type"] for e in lines] == ["SANDBOX_EVENT_TYPE_CREATED", "SANDBOX_EVENT_TYPE_STARTED"]
    assert lines[0]["cursor"] == created["cursor"]
    await delete(caller, sandbox.name)
