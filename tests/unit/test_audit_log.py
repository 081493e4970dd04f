"""AuditLog against a real etcd: concurrent appends of one tenant are batched into transactions and never lost, two
auth replicas appending at once re-chain on the head they lost, and the chain always verifies."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from microvm.types.v1 import auth_pb2 as auth_types
from services.auth.audit import AuditLog
from services.common.errors import Unavailable
from services.common.records import AUDIT_EVENTS
from services.common.registry import etcd_client

pytestmark = pytest.mark.timeout(120)


def event(tenant: str, index: int) -> auth_types.AuditEvent:
    return auth_types.AuditEvent(
        tenant=tenant,
        principal="user",
        method="/microvm.sandbox.v1.SandboxService/UpdateSandbox",
        target=f"sandboxes/s-{index}",
        result="OK",
    )


@pytest.fixture
def tenant() -> str:
    return f"audit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def other_etcd(etcd_server):
    """A second client: another auth replica's connection."""
    client = etcd_client([etcd_server.endpoint])
    await client.connect()
    yield client
    await client.close()


async def test_a_thousand_concurrent_appends_of_one_tenant_are_all_chained(etcd, tenant):
    log = AuditLog(etcd)
    commits = 0
    commit = log.records.commit

    async def counted(*args, **kwargs):
        nonlocal commits
        committed_at = await commit(*args, **kwargs)
        commits += bool(committed_at)
        return committed_at

    log.records.commit = counted
    appended = await asyncio.gather(*(log.append(event(tenant, i)) for i in range(1000)))

    assert sorted(e.sequence for e in appended) == list(range(1, 1001))
    # Each caller got its own event back, as stored.
    assert [e.target for e in appended] == [f"sandboxes/s-{i}" for i in range(1000)]
    stored = {s.message.sequence: s.message for s in await log.records.list(AUDIT_EVENTS, tenant)}
    assert all(stored[e.sequence] == e for e in appended)
    events, valid = await log.list(tenant, None, None)
    assert valid and len(events) == 1000
    # Waiting appends share a transaction: far fewer commits than events.
    assert commits <= 1000 // 50


async def test_two_replicas_appending_at_once_lose_nothing(etcd, other_etcd, tenant):
    first, second = AuditLog(etcd), AuditLog(other_etcd)
    appended = await asyncio.gather(
        *(log.append(event(tenant, 2 * i + n)) for i in range(500) for n, log in enumerate((first, second)))
    )
    assert sorted(e.sequence for e in appended) == list(range(1, 1001))
    events, valid = await first.list(tenant, None, None)
    assert valid and sorted(e.target for e in events) == sorted(e.target for e in appended)


async def test_a_batch_that_lost_the_head_to_another_replica_is_chained_after_it(etcd, other_etcd, tenant):
    first, second = AuditLog(etcd), AuditLog(other_etcd)
    read = first.records.get
    raced = []

    async def stale(kind, *parts):
        head = await read(kind, *parts)
        if not raced:  # another replica appends between this read and the transaction built on it
            raced.append(await second.append(event(tenant, 0)))
        return head

    first.records.get = stale
    mine = await first.append(event(tenant, 1))

    assert (raced[0].sequence, mine.sequence) == (1, 2)
    assert mine.previous_hash == raced[0].hash
    events, valid = await first.list(tenant, None, None)
    assert valid and [e.target for e in events] == ["sandboxes/s-0", "sandboxes/s-1"]


async def test_a_failed_write_fails_its_callers_and_the_next_append_goes_on(etcd, tenant):
    log = AuditLog(etcd)
    commit = log.records.commit
    failures = []

    async def broken_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise ConnectionError("etcd went away")
        return await commit(*args, **kwargs)

    log.records.commit = broken_once
    with pytest.raises(Unavailable):
        await log.append(event(tenant, 0))
    appended = await log.append(event(tenant, 1))
    assert appended.sequence == 1
    events, valid = await log.list(tenant, None, None)
    assert valid and [e.target for e in events] == ["sandboxes/s-1"]


async def test_an_append_whose_caller_went_away_is_still_written(etcd, tenant):
    log = AuditLog(etcd)
    first = asyncio.create_task(log.append(event(tenant, 0)))
    gone = asyncio.create_task(log.append(event(tenant, 1)))
    await asyncio.sleep(0)  # both queued
    gone.cancel()
    await first
    await log.append(event(tenant, 2))  # queued after it: written after it
    events, valid = await log.list(tenant, None, None)
    assert valid and [e.target for e in events] == ["sandboxes/s-0", "sandboxes/s-1", "sandboxes/s-2"]


async def test_the_next_append_chains_on_the_head_it_committed_without_reading_it(etcd, tenant):
    log = AuditLog(etcd)
    await log.append(event(tenant, 0))
    read = log.records.get
    reads = []

    async def counted(kind, *parts):
        reads.append(kind)
        return await read(kind, *parts)

    log.records.get = counted
    second = await log.append(event(tenant, 1))
    assert second.sequence == 2 and reads == []  # one round trip: the swap alone
    events, valid = await log.list(tenant, None, None)
    assert valid and [e.target for e in events] == ["sandboxes/s-0", "sandboxes/s-1"]


async def test_a_head_another_replica_moved_since_is_read_again_and_chained_after(etcd, other_etcd, tenant):
    first, second = AuditLog(etcd), AuditLog(other_etcd)
    await first.append(event(tenant, 0))  # the head first knows
    await second.append(event(tenant, 1))  # moved by another replica since
    mine = await first.append(event(tenant, 2))
    assert mine.sequence == 3
    events, valid = await first.list(tenant, None, None)
    assert valid and [e.target for e in events] == ["sandboxes/s-0", "sandboxes/s-1", "sandboxes/s-2"]
