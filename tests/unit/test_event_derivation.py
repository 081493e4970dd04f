"""Events read off record changes (services/gateway/event_derivation.py) through SandboxEvents.follow on a real etcd:
records written here as their writers write them, for the kinds a fake-VMM installation cannot cause on demand (a
node lost with several sandboxes on it, a failed create) and the changes that must not be events (migrations)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import service_pb2, snapshot_pb2, vm_pb2
from services.common.records import CHANNEL_INCIDENTS, SANDBOXES, SERVICES, SNAPSHOTS, VMS, Records
from services.gateway.events import Cursor, Progress, SandboxEvents
from tests.event_watch import kind

pytestmark = pytest.mark.timeout(60)
RUNNING = sandbox_types.SANDBOX_RECORD_STATE_RUNNING
PAUSED = sandbox_types.SANDBOX_RECORD_STATE_PAUSED
CREATING = sandbox_types.SANDBOX_RECORD_STATE_CREATING
MIGRATING = sandbox_types.SANDBOX_RECORD_STATE_MIGRATING


class Cluster:
    """A tenant's records on a node of its own, written straight into etcd."""

    def __init__(self, etcd) -> None:
        self.etcd, self.records = etcd, Records(etcd)
        tag = uuid.uuid4().hex[:8]
        self.tenant, self.node, self.compute = f"der-{tag}", f"node-der-{tag}", f"compute-der-{tag}"

    def sandbox(self, name: str, state: int = RUNNING, **fields) -> sandbox_types.SandboxRecord:
        return sandbox_types.SandboxRecord(
            id=f"{name}-{self.tenant}", name=name, tenant=self.tenant, node=self.node, state=state, **fields
        )

    async def put(self, record: sandbox_types.SandboxRecord) -> None:
        await self.records.put(SANDBOXES, record, record.id)

    async def register_compute(self) -> None:
        await self.records.put(SERVICES, service_pb2.ServiceRegistration(node=self.node), "compute", self.compute)

    async def events(
        self, after: Cursor | None = None, count: int = 1, tenant: str | None = "", wants=None, source=None
    ):
        """`count` events of the tenant after `after` (and the progress messages seen meanwhile)."""
        source = source or SandboxEvents(self.etcd)
        found, progress = [], []
        stream = source.follow(self.tenant if tenant == "" else tenant, after, wants or (lambda event: True))
        try:
            async with asyncio.timeout(20):
                async for item in stream:
                    (progress if isinstance(item, Progress) else found).append(item)
                    if len(found) == count:
                        break
        finally:
            await stream.aclose()
        return found, progress

    async def now(self) -> Cursor:
        return Cursor(await SandboxEvents(self.etcd).history.head())


@pytest.fixture
async def cluster(etcd):
    cluster = Cluster(etcd)
    yield cluster
    await etcd.delete_prefix(SERVICES.key("compute", cluster.compute))
    for stored in await cluster.records.list(SANDBOXES):
        if stored.message.tenant == cluster.tenant:
            await cluster.records.delete(SANDBOXES, stored.message.id)


async def test_a_lost_node_is_an_event_per_live_sandbox_and_a_cursor_resumes_inside_that_change(cluster):
    await cluster.register_compute()
    for name, state in (("c", RUNNING), ("a", PAUSED), ("b", RUNNING), ("new", CREATING)):
        await cluster.put(cluster.sandbox(name, state))
    start = await cluster.now()
    await cluster.records.delete(SERVICES, "compute", cluster.compute)
    lost, _ = await cluster.events(start, count=3)
    assert [(kind(e), e.sandbox) for e in lost] == [("NODE_LOST", f"sandboxes/{n}") for n in ("a", "b", "c")]
    assert len({e.revision for e in lost}) == 1 and [e.cursor.split(".")[1] for e in lost] == ["0", "1", "2"]
    assert all(e.state == sandbox_pb2.SANDBOX_STATE_UNAVAILABLE for e in lost)
    # Disconnected after the first of them: the other two, and nothing else.
    rest, _ = await cluster.events(Cursor.parse(lost[0].cursor), count=2)
    assert [e.cursor for e in rest] == [e.cursor for e in lost[1:]]
    # The node comes back, is lost again: its sandboxes are lost again.
    await cluster.register_compute()
    again = await cluster.now()
    await cluster.records.delete(SERVICES, "compute", cluster.compute)
    assert len((await cluster.events(again, count=3))[0]) == 3


async def test_a_create_that_failed_is_failed_then_deleted(cluster):
    start = await cluster.now()
    record = cluster.sandbox("doomed", CREATING)
    await cluster.put(record)
    await cluster.records.delete(SANDBOXES, record.id)  # what Sandboxes.start does when the VM cannot start
    seen, _ = await cluster.events(start, count=3)
    assert [kind(e) for e in seen] == ["CREATED", "FAILED", "DELETED"]
    assert seen[1].message == "its creation failed" and seen[1].revision == seen[2].revision


async def test_a_dead_vm_is_one_failed_event_and_a_channel_incident_after_it_none(cluster):
    await cluster.register_compute()
    record = cluster.sandbox("box")
    await cluster.put(record)
    vm = vm_pb2.VmRecord(id=record.id, node=cluster.node, state=vm_pb2.VM_STATE_RUNNING, pid=4242)
    await cluster.records.put(VMS, vm, cluster.node, record.id)
    start = await cluster.now()
    vm.state, vm.failure_message = vm_pb2.VM_STATE_FAILED, "the VMM exited with status 137"
    await cluster.records.put(VMS, vm, cluster.node, record.id)
    incident = vm_pb2.ChannelIncident(reason="a flood of frames", vmm_pid=4242)
    await cluster.records.put(CHANNEL_INCIDENTS, incident, cluster.node, record.id)
    await cluster.records.delete(SANDBOXES, record.id)
    seen, _ = await cluster.events(start, count=2)
    assert [(kind(e), e.message) for e in seen] == [("FAILED", "the VMM exited with status 137"), ("DELETED", "")]
    await cluster.records.delete(VMS, cluster.node, record.id)
    await cluster.records.delete(CHANNEL_INCIDENTS, cluster.node, record.id)


async def test_a_channel_incident_of_a_running_sandbox_is_a_failed_event(cluster):
    await cluster.register_compute()
    record = cluster.sandbox("chatty")
    await cluster.put(record)
    await cluster.records.put(
        VMS, vm_pb2.VmRecord(id=record.id, state=vm_pb2.VM_STATE_RUNNING, pid=7), cluster.node, record.id
    )
    start = await cluster.now()
    await cluster.records.put(
        CHANNEL_INCIDENTS, vm_pb2.ChannelIncident(reason="oversized frame", vmm_pid=7), cluster.node, record.id
    )
    (failed,), _ = await cluster.events(start)
    assert kind(failed) == "FAILED" and "oversized frame" in failed.message
    await cluster.records.delete(VMS, cluster.node, record.id)
    await cluster.records.delete(CHANNEL_INCIDENTS, cluster.node, record.id)


async def test_a_migration_is_no_event_and_only_a_tenants_own_snapshot_is(cluster):
    await cluster.register_compute()
    record = cluster.sandbox("mover")
    await cluster.put(record)
    start = await cluster.now()
    for state, node in ((MIGRATING, cluster.node), (RUNNING, cluster.node + "-b")):
        record.state, record.node = state, node
        await cluster.put(record)
    migration = snapshot_pb2.SnapshotRecord(id=f"snap-m-{cluster.tenant}", tenant="", source_sandbox=record.id)
    await cluster.records.put(SNAPSHOTS, migration, migration.id)
    taken = snapshot_pb2.SnapshotRecord(id=f"snap-t-{cluster.tenant}", tenant=cluster.tenant, source_sandbox=record.id)
    await cluster.records.put(SNAPSHOTS, taken, taken.id)
    taken.holder_nodes.append("elsewhere")  # a node that fetched it: no new snapshot
    await cluster.records.put(SNAPSHOTS, taken, taken.id)
    record.state = PAUSED
    await cluster.put(record)
    seen, _ = await cluster.events(start, count=2)
    assert [(kind(e), e.snapshot) for e in seen] == [("SNAPSHOTTED", f"snapshots/{taken.id}"), ("PAUSED", "")]
    for snapshot in (migration, taken):
        await cluster.records.delete(SNAPSHOTS, snapshot.id)


async def test_a_backlog_is_sent_before_the_watch_says_it_caught_up(cluster):
    start = await cluster.now()
    for name in ("one", "two"):
        await cluster.put(cluster.sandbox(name, CREATING))
    seen, progress = await cluster.events(start, count=2)
    assert [e.sandbox for e in seen] == ["sandboxes/one", "sandboxes/two"]
    assert progress == [Progress(start, False)]
    # Another tenant's watch sees none of it; a watch of every tenant does.
    other = Cluster(cluster.etcd)
    other.tenant = "der-nobody"
    await other.put(other.sandbox("theirs", CREATING))
    ours = {cluster.tenant, other.tenant}
    everyone, _ = await cluster.events(start, count=3, tenant=None, wants=lambda event: event.tenant in ours)
    assert [e.sandbox for e in everyone] == ["sandboxes/one", "sandboxes/two", "sandboxes/theirs"]
    await other.records.delete(SANDBOXES, other.sandbox("theirs").id)


async def test_a_watch_that_falls_behind_ends_unavailable_and_resumes_from_its_cursor(cluster, monkeypatch):
    from services.common.errors import Unavailable
    from services.gateway import event_history

    monkeypatch.setattr(event_history, "MAX_BACKLOG", 2)
    start = await cluster.now()
    stream = SandboxEvents(cluster.etcd).follow(cluster.tenant, start, lambda event: True)
    assert isinstance(await anext(stream), Progress)  # in place; nothing read meanwhile
    for index in range(6):
        await cluster.put(cluster.sandbox(f"s{index}", CREATING))
    await asyncio.sleep(0.5)
    got = []
    with pytest.raises(Unavailable) as behind:
        async for item in stream:
            if not isinstance(item, Progress):
                got.append(item)
    assert behind.value.reason == "WATCH_FELL_BEHIND" and 0 < len(got) < 6
    rest, _ = await cluster.events(Cursor.parse(got[-1].cursor), count=6 - len(got))
    assert [e.sandbox for e in got + rest] == [f"sandboxes/s{i}" for i in range(6)]


async def test_a_replay_etcd_sends_late_still_comes_before_caught_up(cluster, monkeypatch):
    """etcd sends a catching-up watch nothing while its replay is under way: silence is not the end of the backlog."""
    from microvm.types.v1 import event_pb2
    from services.common.records import EVENT_FENCES
    from services.gateway import event_history

    start = await cluster.now()
    await cluster.put(cluster.sandbox("late", CREATING))
    next_batch, held = event_history.EtcdWatch.next, []

    async def silent_at_first(watch, timeout=None):
        if not held:  # the first wait sees nothing for longer than any quiet period would have allowed
            held.append(await asyncio.sleep(min(timeout or 3.0, 3.0)))
            return None
        return await next_batch(watch, timeout)

    monkeypatch.setattr(event_history.EtcdWatch, "next", silent_at_first)
    source = SandboxEvents(cluster.etcd, instance_id=f"gw-{cluster.tenant}")
    seen = []
    async with asyncio.timeout(20):
        async for item in source.follow(cluster.tenant, start, lambda event: True):
            seen.append(item)
            if isinstance(item, Progress) and item.caught_up:
                break
    assert [type(item).__name__ for item in seen] == ["Progress", "Progress", "SandboxEvent", "Progress"]
    assert not seen[0].caught_up and seen[2].sandbox == "sandboxes/late"
    fence = await cluster.records.get(EVENT_FENCES, f"gw-{cluster.tenant}")
    assert isinstance(fence.message, event_pb2.EventFence) and seen[-1].cursor.revision >= fence.revision
    await cluster.etcd.delete(EVENT_FENCES.key(f"gw-{cluster.tenant}"))


async def test_a_fence_whose_lease_ran_out_is_written_without_it(cluster):
    from services.common.records import EVENT_FENCES

    lease = await cluster.etcd.lease(5)
    await lease.revoke()  # the registration's lease expired; the registry has not granted the next one yet
    start = await cluster.now()
    await cluster.put(cluster.sandbox("unleased", CREATING))
    source = SandboxEvents(cluster.etcd, instance_id=f"gw-lapsed-{cluster.tenant}", lease=lambda: lease)
    found, progress = await cluster.events(start, count=1, source=source)
    assert found[0].sandbox == "sandboxes/unleased"
    fence = await cluster.etcd.get(EVENT_FENCES.key(f"gw-lapsed-{cluster.tenant}"))
    assert fence is not None and fence.lease == 0
    await cluster.etcd.delete(EVENT_FENCES.key(f"gw-lapsed-{cluster.tenant}"))
