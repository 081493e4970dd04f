"""A tenant's disk quota covers its sandboxes (each at the most its disk can grow to: its template's 1 GiB root
filesystem here) and its snapshots (as reserved), checked in the transaction that takes the room whichever of the
two asks, so concurrent creates and snapshots never exceed it. A whole installation (fake VMM) in this loop."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from services.common.records import QUOTA_USAGE, SANDBOXES, Records
from tests.inprocess import etcd_client_for, tenant_caller

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30
# A snapshot of a 256 MiB guest reserves its RAM plus a 1 GiB disk allowance.
SNAPSHOT = (256 + 1024) << 20


async def call(caller, method: str, request):
    try:
        return await getattr(caller.stub, method)(request, metadata=caller.metadata, timeout=60)
    except grpc.aio.AioRpcError as error:
        return error


def refused_for_disk(result) -> bool:
    return (
        isinstance(result, grpc.aio.AioRpcError)
        and result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and error_info(result).metadata.get("resource") == "disk_bytes"
    )


async def disk_held(installation, tenant: str) -> int:
    records = Records(etcd_client_for(installation.etcd_endpoint))
    sandboxes = [s.message for s in await records.list(SANDBOXES) if s.message.tenant == tenant]
    usage = await records.get(QUOTA_USAGE, tenant)
    return sum(s.disk_bytes for s in sandboxes) + (usage.message.used.snapshot_bytes if usage else 0)


async def test_sandboxes_and_snapshots_share_the_disk_quota(installation):
    tenant = f"disk-{uuid.uuid4().hex[:6]}"
    caller = await tenant_caller(installation, tenant, max_disk_bytes=GIB * 5 // 2)
    first = (await call(caller, "CreateSandbox", api.CreateSandboxRequest())).sandbox
    second = (await call(caller, "CreateSandbox", api.CreateSandboxRequest())).sandbox
    assert refused_for_disk(await call(caller, "CreateSandbox", api.CreateSandboxRequest()))  # 3 GiB of 2.5
    # 2 GiB of disks + 1.25 GiB of snapshot > 2.5 GiB.
    assert refused_for_disk(await call(caller, "CreateSnapshot", api.CreateSnapshotRequest(sandbox=first.name)))
    await call(caller, "DeleteSandbox", api.DeleteSandboxRequest(name=second.name))
    snapshot = (await call(caller, "CreateSnapshot", api.CreateSnapshotRequest(sandbox=first.name))).snapshot
    assert snapshot.name
    # 1 GiB + 1.25 GiB of snapshot: a second sandbox would make 3.25 GiB.
    assert refused_for_disk(await call(caller, "CreateSandbox", api.CreateSandboxRequest()))
    await call(caller, "DeleteSnapshot", api.DeleteSnapshotRequest(name=snapshot.name))
    again = (await call(caller, "CreateSandbox", api.CreateSandboxRequest())).sandbox
    for sandbox in (first, again):
        await call(caller, "DeleteSandbox", api.DeleteSandboxRequest(name=sandbox.name))
    assert await disk_held(installation, tenant) == 0


async def test_race_concurrent_creates_and_snapshots_never_exceed_the_disk_quota(installation):
    tenant = f"disk-race-{uuid.uuid4().hex[:6]}"
    limit = 4 * GIB
    caller = await tenant_caller(installation, tenant, max_disk_bytes=limit)
    seed = (await call(caller, "CreateSandbox", api.CreateSandboxRequest())).sandbox
    creates = [call(caller, "CreateSandbox", api.CreateSandboxRequest()) for _ in range(6)]
    snapshots = [call(caller, "CreateSnapshot", api.CreateSnapshotRequest(sandbox=seed.name)) for _ in range(4)]
    results = await asyncio.gather(*creates, *snapshots)
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert errors and all(refused_for_disk(e) for e in errors), [e.details() for e in errors]
    held = await disk_held(installation, tenant)
    assert GIB < held <= limit
    listed = await caller.stub.ListSandboxes(api.ListSandboxesRequest(), metadata=caller.metadata)
    taken = await caller.stub.ListSnapshots(api.ListSnapshotsRequest(), metadata=caller.metadata)
    for snapshot in taken.snapshots:
        await call(caller, "DeleteSnapshot", api.DeleteSnapshotRequest(name=snapshot.name))
    for sandbox in listed.sandboxes:
        await call(caller, "DeleteSandbox", api.DeleteSandboxRequest(name=sandbox.name))
    assert await disk_held(installation, tenant) == 0
