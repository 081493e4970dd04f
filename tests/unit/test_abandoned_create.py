"""A gateway killed between writing a sandbox's record (CREATING) and marking it RUNNING leaves the record to nobody:
only the create that wrote it moves it on. The reaper of any gateway takes such a record once the longest create
has certainly given up, deleting its VM and releasing the tenant's quota (found by the chaos suite, docs/testing.md).
A whole installation (fake VMM) in this loop."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.records import SANDBOXES, VMS, Records
from services.gateway.sandbox_upkeep import ABANDONED_CREATE_SECONDS
from tests.inprocess import etcd_client_for, tenant_caller

pytestmark = pytest.mark.timeout(120)


async def left_as_the_dead_gateway_left_it(records: Records, sandbox_id: str, age: float) -> None:
    stored = await records.get(SANDBOXES, sandbox_id)
    record = stored.message
    record.state = sandbox_types.SANDBOX_RECORD_STATE_CREATING
    record.update_time.FromSeconds(int(time.time() - age))
    await records.put(SANDBOXES, record, sandbox_id)


async def wait_gone(records: Records, sandbox_id: str, node: str) -> None:
    for _ in range(200):
        if await records.get(SANDBOXES, sandbox_id) is None and await records.get(VMS, node, sandbox_id) is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the abandoned create {sandbox_id} was not reaped")


async def test_an_abandoned_create_is_reaped_and_its_quota_released(installation):
    tenant = f"abandon-{uuid.uuid4().hex[:6]}"
    caller = await tenant_caller(installation, tenant, max_sandboxes=1)
    records = Records(etcd_client_for(installation.etcd_endpoint))
    await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    (record,) = [stored.message for stored in await records.list(SANDBOXES) if stored.message.tenant == tenant]
    assert await records.get(VMS, record.node, record.id) is not None

    # Recent: a create still under way is left alone.
    await left_as_the_dead_gateway_left_it(records, record.id, age=5)
    await asyncio.sleep(1.5)  # more than one reaper pass
    assert (await records.get(SANDBOXES, record.id)).message.state == sandbox_types.SANDBOX_RECORD_STATE_CREATING

    await left_as_the_dead_gateway_left_it(records, record.id, age=ABANDONED_CREATE_SECONDS + 1)
    await wait_gone(records, record.id, record.node)
    again = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    assert again.sandbox.state  # the quota of 1 is free again
