"""The data plane's read of a sandbox: its record, VM record and channel incident in one etcd round trip once its
node is known, and never a stale answer when the sandbox moved, broke or went away (real etcd)."""

from __future__ import annotations

import pytest

from microvm.auth.v1 import auth_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import vm_pb2
from services.common.errors import NotFound
from services.common.records import CHANNEL_INCIDENTS, SANDBOXES, VMS, Records
from services.gateway import access
from services.gateway.records import SandboxStore, sandbox_key
from tests.etcd import CountingEtcd


@pytest.fixture
def tenant(calling_tenant):
    return calling_tenant


async def place(records: Records, tenant: str, name: str, node: str, pid: int = 100) -> str:
    sandbox_id = sandbox_key(tenant, name)
    record = sandbox_types.SandboxRecord(
        id=sandbox_id, name=name, tenant=tenant, node=node, state=sandbox_types.SANDBOX_RECORD_STATE_RUNNING
    )
    await records.put(SANDBOXES, record, sandbox_id)
    await records.put(VMS, vm_pb2.VmRecord(id=sandbox_id, state=vm_pb2.VM_STATE_RUNNING, pid=pid), node, sandbox_id)
    return sandbox_id


async def test_a_known_sandbox_is_read_in_one_round_trip_and_its_changes_are_seen(etcd, tenant):
    counting = CountingEtcd(etcd)
    store, records = SandboxStore(counting), Records(etcd)
    sandbox_id = await place(records, tenant, "box", "node-a")

    record, vm, incident = await store.with_vm("box")
    assert (record.node, vm.state, incident) == ("node-a", vm_pb2.VM_STATE_RUNNING, None)
    assert counting.requests == ["get", "get", "get"]  # the record, then its VM and incident

    counting.requests.clear()
    record, vm, incident = await store.with_vm("box")
    assert (record.node, vm.pid, incident) == ("node-a", 100, None)
    assert counting.requests == ["transaction"]

    # Its channel broke: seen on the hinted read.
    await records.put(CHANNEL_INCIDENTS, vm_pb2.ChannelIncident(reason="bad frame", vmm_pid=100), "node-a", sandbox_id)
    _, _, incident = await store.with_vm("box")
    assert incident.reason == "bad frame"

    # It moved: the hint's node no longer matches, so it is read afresh on its new node.
    await place(records, tenant, "box", "node-b", pid=200)
    counting.requests.clear()
    record, vm, incident = await store.with_vm("box")
    assert (record.node, vm.pid, incident) == ("node-b", 200, None)
    assert counting.requests == ["transaction", "get", "get", "get"]
    counting.requests.clear()
    await store.with_vm("box")
    assert counting.requests == ["transaction"]

    # It went away: NOT_FOUND, as without a hint.
    await records.delete(SANDBOXES, sandbox_id)
    with pytest.raises(NotFound):
        await store.with_vm("box")
    assert (tenant, "box") not in store.node_hints


async def test_a_hint_never_reaches_another_tenants_sandbox_of_the_same_name(etcd, tenant):
    store, records = SandboxStore(etcd), Records(etcd)
    await place(records, tenant, "shared-name", "node-a")
    await store.with_vm("shared-name")
    token = access._principal.set(auth_pb2.Principal(id="other", tenant=f"{tenant}-other"))
    try:
        with pytest.raises(NotFound):
            await store.with_vm("shared-name")
    finally:
        access._principal.reset(token)


async def test_a_change_from_a_known_revision_writes_at_once_and_rereads_on_a_conflict(etcd, tenant):
    counting = CountingEtcd(etcd)
    store, records = SandboxStore(counting), Records(etcd)
    sandbox_id = sandbox_key(tenant, "made")
    creating = sandbox_types.SandboxRecord(
        id=sandbox_id, name="made", tenant=tenant, node="node-a", state=sandbox_types.SANDBOX_RECORD_STATE_CREATING
    )
    revision = await records.put(SANDBOXES, creating, sandbox_id)

    def running(record):
        record.state = sandbox_types.SANDBOX_RECORD_STATE_RUNNING

    changed = await store.change(creating, running, revision=revision)
    assert changed.state == sandbox_types.SANDBOX_RECORD_STATE_RUNNING
    assert counting.requests == ["transaction"]
    assert creating.state == sandbox_types.SANDBOX_RECORD_STATE_CREATING  # the caller's copy is left as it was

    # Changed since that revision (labelled by someone else): read again, and their change is kept.
    labelled = (await records.get(SANDBOXES, sandbox_id)).message
    labelled.labels["by"] = "someone"
    await records.put(SANDBOXES, labelled, sandbox_id)
    counting.requests.clear()
    changed = await store.change(creating, running, revision=revision)
    assert counting.requests == ["transaction", "get", "transaction"]
    assert changed.labels["by"] == "someone"


async def test_a_sandbox_just_created_here_is_read_in_one_round_trip(etcd, tenant):
    """The create knows where it placed the sandbox: its first command needs no read to find the node."""
    counting = CountingEtcd(etcd)
    store, records = SandboxStore(counting), Records(etcd)
    await place(records, tenant, "fresh", "node-a")
    store.remember_node((await records.get(SANDBOXES, sandbox_key(tenant, "fresh"))).message)
    counting.requests.clear()
    record, vm, _ = await store.with_vm("fresh")
    assert (record.node, vm.state) == ("node-a", vm_pb2.VM_STATE_RUNNING)
    assert counting.requests == ["transaction"]
