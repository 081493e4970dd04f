"""A gateway killed between writing a sandbox's record (CREATING) and marking it RUNNING leaves the record to nobody:
only the create that wrote it moves it on. The reaper of any gateway takes such a record once the longest create
has certainly given up, deleting its VM and releasing the tenant's quota (found by the chaos suite, docs/testing.md).
A gateway known to be gone (its registration lapsed) has its creates settled sooner: finished when the VM runs,
undone when there is none. A whole installation (fake VMM) in this loop."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.records import SANDBOXES, VMS, Records
from services.gateway.records import sandbox_key
from services.gateway.sandbox_upkeep import ABANDONED_CREATE_SECONDS, GONE_GATEWAY_GRACE_SECONDS
from tests.inprocess import etcd_client_for, tenant_caller

pytestmark = pytest.mark.timeout(120)


async def left_as_the_dead_gateway_left_it(records: Records, sandbox_id: str, age: float, gateway: str = "") -> None:
    """The record as a create leaves it, `age` seconds ago; by `gateway` when given (else the one that made it)."""
    stored = await records.get(SANDBOXES, sandbox_id)
    record = stored.message
    record.state = sandbox_types.SANDBOX_RECORD_STATE_CREATING
    record.creating_gateway = gateway or record.creating_gateway
    record.update_time.FromSeconds(int(time.time() - age))
    await records.put(SANDBOXES, record, sandbox_id)


async def wait_gone(records: Records, sandbox_id: str, node: str) -> None:
    for _ in range(200):
        if await records.get(SANDBOXES, sandbox_id) is None and await records.get(VMS, node, sandbox_id) is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the abandoned create {sandbox_id} was not reaped")


async def one_sandbox(installation, prefix: str, **quota) -> tuple:
    """A new tenant's caller, the installation's records, and the record of the one sandbox it created."""
    tenant = f"{prefix}-{uuid.uuid4().hex[:6]}"
    caller = await tenant_caller(installation, tenant, **quota)
    records = Records(etcd_client_for(installation.etcd_endpoint))
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    (record,) = [stored.message for stored in await records.list(SANDBOXES) if stored.message.tenant == tenant]
    return caller, records, record, created.sandbox


async def test_an_abandoned_create_is_reaped_and_its_quota_released(installation):
    caller, records, record, _ = await one_sandbox(installation, "abandon", max_sandboxes=1)
    assert await records.get(VMS, record.node, record.id) is not None

    # Recent: a create still under way is left alone.
    await left_as_the_dead_gateway_left_it(records, record.id, age=5)
    await asyncio.sleep(1.5)  # more than one reaper pass
    assert (await records.get(SANDBOXES, record.id)).message.state == sandbox_types.SANDBOX_RECORD_STATE_CREATING

    await left_as_the_dead_gateway_left_it(records, record.id, age=ABANDONED_CREATE_SECONDS + 1)
    await wait_gone(records, record.id, record.node)
    again = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    assert again.sandbox.state  # the quota of 1 is free again


async def settled_state(records: Records, sandbox_id: str):
    """The record's state once it is neither CREATING nor on its way out (None: the record is gone)."""
    passing = (sandbox_types.SANDBOX_RECORD_STATE_CREATING, sandbox_types.SANDBOX_RECORD_STATE_DELETING)
    for _ in range(200):
        stored = await records.get(SANDBOXES, sandbox_id)
        if stored is None or stored.message.state not in passing:
            return stored and stored.message.state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the create of {sandbox_id} was never settled")


async def test_the_create_of_a_gone_gateway_is_finished_when_its_vm_runs(installation):
    """The chaos suite's case: the gateway killed after its VM started and before the record said so. The caller's
    retry finds the name taken (ALREADY_EXISTS); the sandbox must become theirs, not sit CREATING for minutes."""
    caller, records, record, sandbox = await one_sandbox(installation, "gone")
    assert record.creating_gateway  # the live gateway that made it

    # Its own gateway alive: a create ten seconds old is still that gateway's.
    await left_as_the_dead_gateway_left_it(records, record.id, age=GONE_GATEWAY_GRACE_SECONDS + 2)
    await asyncio.sleep(1.5)  # more than one reaper pass
    assert (await records.get(SANDBOXES, record.id)).message.state == sandbox_types.SANDBOX_RECORD_STATE_CREATING

    await left_as_the_dead_gateway_left_it(records, record.id, age=2, gateway="gateway-that-died")
    await asyncio.sleep(1.5)
    assert (await records.get(SANDBOXES, record.id)).message.state == sandbox_types.SANDBOX_RECORD_STATE_CREATING

    await left_as_the_dead_gateway_left_it(
        records, record.id, age=GONE_GATEWAY_GRACE_SECONDS + 2, gateway="gateway-that-died"
    )
    assert await settled_state(records, record.id) == sandbox_types.SANDBOX_RECORD_STATE_RUNNING
    got = await caller.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), metadata=caller.metadata)
    assert got.sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING and got.sandbox.hypervisor
    async for event in caller.stub.Exec(
        api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["true"])),
        metadata=caller.metadata,
        timeout=30,
    ):
        if event.HasField("exited"):
            assert event.exited.exit_code == 0


async def test_the_create_of_a_gone_gateway_without_a_vm_is_undone(installation):
    caller, records, record, _ = await one_sandbox(installation, "ghost", max_sandboxes=1)
    # A second record of the tenant, placed by a gateway that died before any VM started: it holds the quota of 1.
    ghost = sandbox_types.SandboxRecord()
    ghost.CopyFrom(record)
    ghost.id, ghost.name = sandbox_key(record.tenant, "ghost-1"), "ghost-1"
    await records.put(SANDBOXES, ghost, ghost.id)
    await left_as_the_dead_gateway_left_it(
        records, ghost.id, age=GONE_GATEWAY_GRACE_SECONDS + 2, gateway="gateway-that-died"
    )
    assert await settled_state(records, ghost.id) is None
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=f"sandboxes/{record.name}"), metadata=caller.metadata)
    again = await caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox_id="ghost-1"), metadata=caller.metadata, timeout=60
    )
    assert again.sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING  # the name and the quota are free again
