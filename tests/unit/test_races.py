"""Races on one tenant: create, delete, fork, pause, resume and snapshot at once. The tenant's quota holds at every
moment (it is checked in the transaction that creates a record; deleting the record releases it), a sandbox deleted
while being created stays deleted, and nothing is left behind: no VM, address, attachment, snapshot or reservation.
A whole installation (fake VMM) in this event loop."""

from __future__ import annotations

import asyncio
import random
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.records import (
    ADDRESSES,
    ATTACHMENTS,
    PENDING_ARTIFACTS,
    QUOTA_RESERVATIONS,
    SANDBOXES,
    SNAPSHOTS,
    VMS,
    Records,
)
from services.gateway.records import sandbox_key
from tests.inprocess import Caller, etcd_client_for, tenant_caller

pytestmark = pytest.mark.timeout(240)
# What a racing call may be answered besides OK: each says plainly that another call won.
LOST_RACE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}


class Tenant:
    """A racer's view: its calls, the statuses they got and every sandbox id it ever saw."""

    def __init__(self, caller: Caller, tenant: str) -> None:
        self.caller, self.name = caller, tenant
        self.statuses: list[grpc.StatusCode] = []
        self.seen: set[str] = set()

    async def call(self, method: str, request):
        try:
            reply = await getattr(self.caller.stub, method)(request, metadata=self.caller.metadata, timeout=60)
        except grpc.aio.AioRpcError as error:
            assert error.code() in LOST_RACE, f"{method}: {error.code()} {error.details()}"
            self.statuses.append(error.code())
            return None
        self.statuses.append(grpc.StatusCode.OK)
        for sandbox in getattr(reply, "sandboxes", []) or ([reply.sandbox] if hasattr(reply, "sandbox") else []):
            if sandbox.name:
                self.seen.add(sandbox.name.removeprefix("sandboxes/"))
        return reply

    async def names(self) -> list[str]:
        reply = await self.caller.stub.ListSandboxes(api.ListSandboxesRequest(), metadata=self.caller.metadata)
        return [s.name for s in reply.sandboxes]


async def tenant_records(records: Records, tenant: str) -> list:
    return [s.message for s in await records.list(SANDBOXES) if s.message.tenant == tenant]


async def most_held(records: Records, tenant: str, stop: asyncio.Event) -> int:
    """The most sandbox records the tenant held at any sampled moment."""
    most = 0
    while not stop.is_set():
        most = max(most, len(await tenant_records(records, tenant)))
        await asyncio.sleep(0.005)
    return most


async def racer(tenant: Tenant, seed: int, operations: int) -> None:
    chance = random.Random(seed)
    for _ in range(operations):
        names = await tenant.names()
        name = chance.choice(names) if names else "sandboxes/none"
        action = chance.choice(["create", "create", "delete", "fork", "pause", "resume", "snapshot"])
        if action == "create":
            await tenant.call("CreateSandbox", api.CreateSandboxRequest())
        elif action == "delete":
            await tenant.call("DeleteSandbox", api.DeleteSandboxRequest(name=name))
        elif action == "fork":
            await tenant.call("ForkSandbox", api.ForkSandboxRequest(name=name, count=chance.choice([1, 2])))
        elif action == "pause":
            await tenant.call("PauseSandbox", api.PauseSandboxRequest(name=name))
        elif action == "resume":
            await tenant.call("ResumeSandbox", api.ResumeSandboxRequest(name=name))
        else:
            await tenant.call("CreateSnapshot", api.CreateSnapshotRequest(sandbox=name))


async def clean_up(tenant: Tenant) -> None:
    for name in await tenant.names():
        await tenant.call("DeleteSandbox", api.DeleteSandboxRequest(name=name))
    snapshots = await tenant.caller.stub.ListSnapshots(api.ListSnapshotsRequest(), metadata=tenant.caller.metadata)
    for snapshot in snapshots.snapshots:
        await tenant.call("DeleteSnapshot", api.DeleteSnapshotRequest(name=snapshot.name))


async def leftovers(installation, tenant: Tenant) -> dict[str, list[str]]:
    """What the tenant's sandboxes left anywhere in the cluster's records."""
    client = etcd_client_for(installation.etcd_endpoint)
    await client.connect()
    records = Records(client)
    node = installation.node
    ids = {sandbox_key(tenant.name, name) for name in tenant.seen}  # the ids the nodes' records use
    found = {
        "sandboxes": [r.id for r in await tenant_records(records, tenant.name)],
        "vms": [s.parts[-1] for s in await records.list(VMS, node) if s.parts[-1] in ids],
        "attachments": [s.parts[-1] for s in await records.list(ATTACHMENTS, node) if s.parts[-1] in ids],
        "addresses": [s.parts[-1] for s in await records.list(ADDRESSES, node) if s.message.sandbox_id in ids],
        "snapshots": [s.message.id for s in await records.list(SNAPSHOTS) if s.message.tenant == tenant.name],
        "reservations": [s.parts[-1] for s in await records.list(QUOTA_RESERVATIONS, tenant.name)],
    }
    snapshots = {s.message.id for s in await records.list(SNAPSHOTS) if s.message.tenant == tenant.name}
    found["pending_artifacts"] = [s.parts[0] for s in await records.list(PENDING_ARTIFACTS) if s.parts[0] in snapshots]
    await client.close()
    return {kind: ids for kind, ids in found.items() if ids}


@pytest.mark.parametrize("limit", [1, 3])
async def test_race_mixed_calls_on_one_tenant_never_exceed_its_quota_nor_leave_anything(installation, limit):
    name = f"race-{uuid.uuid4().hex[:6]}"
    tenant = Tenant(await tenant_caller(installation, name, max_sandboxes=limit), name)
    client = etcd_client_for(installation.etcd_endpoint)
    await client.connect()
    stop = asyncio.Event()
    watcher = asyncio.create_task(most_held(Records(client), name, stop))
    try:
        await asyncio.gather(*(racer(tenant, seed, operations=12) for seed in range(6)))
    finally:
        stop.set()
        most = await watcher
        await clean_up(tenant)
        await client.close()
    assert 1 <= most <= limit
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in tenant.statuses  # the limit was reached, and held
    assert await leftovers(installation, tenant) == {}
    tally = {c.name: tenant.statuses.count(c) for c in set(tenant.statuses)}
    print(f"limit {limit}: most held {most}; statuses {tally}")


async def test_race_a_sandbox_deleted_while_being_created_stays_deleted(installation):
    """Delete lands while create is still starting the VM: create fails ABORTED (or the delete finds nothing yet),
    and in every interleaving the record, the VM and the quota are gone afterwards."""
    name = f"race-del-{uuid.uuid4().hex[:6]}"
    tenant = Tenant(await tenant_caller(installation, name, max_sandboxes=1), name)
    for round_ in range(8):
        sandbox_id = f"r{round_}-{uuid.uuid4().hex[:6]}"
        tenant.seen.add(sandbox_id)
        create = asyncio.create_task(tenant.call("CreateSandbox", api.CreateSandboxRequest(sandbox_id=sandbox_id)))
        await asyncio.sleep(0.01 * round_)
        await tenant.call("DeleteSandbox", api.DeleteSandboxRequest(name=f"sandboxes/{sandbox_id}"))
        created = await create
        if created is not None:  # the delete came before the record: delete it now
            await tenant.call("DeleteSandbox", api.DeleteSandboxRequest(name=f"sandboxes/{sandbox_id}"))
        assert await tenant.names() == []
    # The quota of 1 was given back every time.
    assert await tenant.call("CreateSandbox", api.CreateSandboxRequest()) is not None
    await clean_up(tenant)
    assert await leftovers(installation, tenant) == {}


async def test_race_changes_never_bring_back_a_deleted_sandbox(installation):
    """Updates, pauses and resumes racing a delete: each writes the record back only if nobody changed it since it
    was read, so the deleted sandbox stays deleted and its quota is not given out twice."""
    name = f"race-upd-{uuid.uuid4().hex[:6]}"
    tenant = Tenant(await tenant_caller(installation, name, max_sandboxes=1), name)
    for round_ in range(12):
        created = await tenant.call("CreateSandbox", api.CreateSandboxRequest())
        sandbox = created.sandbox.name
        changes = [
            api.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=sandbox, labels={"round": str(round_), "n": str(n)}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            )
            for n in range(6)
        ]
        await asyncio.gather(
            tenant.call("DeleteSandbox", api.DeleteSandboxRequest(name=sandbox)),
            tenant.call("PauseSandbox", api.PauseSandboxRequest(name=sandbox)),
            tenant.call("ResumeSandbox", api.ResumeSandboxRequest(name=sandbox)),
            *(tenant.call("UpdateSandbox", change) for change in changes),
        )
        assert await tenant.names() == [], f"round {round_}: a deleted sandbox came back"
    assert await leftovers(installation, tenant) == {}
