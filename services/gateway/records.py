"""Sandbox records (`/microvm/sandboxes/<id>`, written only by the gateway) and the public view of them.

A record says where a sandbox runs (`node`); what the caller sees also reflects the VM's own record (written by
its node's compute: a VM that died shows as FAILED without anyone telling the gateway) and whether the node is
alive (a node whose lease ran out makes its sandboxes UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import time

from google.protobuf.message import Message

from microvm.sandbox.v1 import sandbox_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import vm_pb2
from services.common import observability
from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from services.common.records import CHANNEL_INCIDENTS, SANDBOX_TOMBSTONES, SANDBOXES, VMS, Records, Stored
from services.gateway.access import current_tenant

SandboxRecord = sandbox_types.SandboxRecord
SandboxTombstone = sandbox_types.SandboxTombstone
SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RUNNING = sandbox_types.SANDBOX_RECORD_STATE_RUNNING
PAUSED = sandbox_types.SANDBOX_RECORD_STATE_PAUSED
MIGRATING = sandbox_types.SANDBOX_RECORD_STATE_MIGRATING
VM_TO_SANDBOX = {
    vm_pb2.VM_STATE_CREATING: sandbox_pb2.SANDBOX_STATE_CREATING,
    vm_pb2.VM_STATE_RUNNING: sandbox_pb2.SANDBOX_STATE_RUNNING,
    vm_pb2.VM_STATE_PAUSED: sandbox_pb2.SANDBOX_STATE_PAUSED,
    vm_pb2.VM_STATE_STOPPED: sandbox_pb2.SANDBOX_STATE_FAILED,
    vm_pb2.VM_STATE_FAILED: sandbox_pb2.SANDBOX_STATE_FAILED,
}

MAX_NODE_HINTS = 100_000  # about 10 MB at most


def convert(message: Message, into: type[Message]):
    """The same message under another declaration (public API <-> stored record): their fields are identical, as
    tests/unit/test_records.py checks, so the wire form carries over."""
    return into.FromString(message.SerializeToString())


def image_of(record) -> str:
    """The compute image a sandbox (or snapshot) record's VM boots: a user template's build image, else the
    built-in template of that name."""
    return record.image or record.template


def sandbox_key(tenant: str, name: str) -> str:
    """The cluster-wide id of tenant `tenant`'s sandbox `name`. Ids are per tenant: a name one tenant chose can never
    collide with another tenant's sandbox, so ALREADY_EXISTS on a chosen name reveals nothing about anyone else."""
    digest = hashlib.sha256(f"{tenant}\0{name}".encode()).hexdigest()[:16]
    return f"{name[:46]}-{digest}"


def name_of(record: SandboxRecord) -> str:
    """The id the tenant knows the sandbox by (records from before per-tenant ids: their id)."""
    return record.name or record.id


def not_found(sandbox_id: str) -> NotFound:
    return NotFound(
        f"sandbox {sandbox_id} does not exist",
        reason="SANDBOX_NOT_FOUND",
        metadata={"sandbox": f"sandboxes/{sandbox_id}"},
    )


def state_name(state: int) -> str:
    return sandbox_pb2.SandboxState.Name(state).removeprefix("SANDBOX_STATE_")


def record_state_name(state: int) -> str:
    return sandbox_types.SandboxRecordState.Name(state).removeprefix("SANDBOX_RECORD_STATE_")


def to_public(
    record: SandboxRecord, vm: vm_pb2.VmRecord | None, node_alive: bool, incident: vm_pb2.ChannelIncident | None = None
) -> sandbox_pb2.Sandbox:
    """What the caller sees: the record, refined by its VM's state, its node's liveness and whether its guest lost
    its agent channel for breaking the protocol."""
    sandbox = sandbox_pb2.Sandbox(
        name=f"sandboxes/{name_of(record)}",
        template=record.template,
        template_build=f"templates/{record.template.partition(':')[0]}/builds/{record.template_build}"
        if record.template_build
        else "",
        state=record.state,
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        labels=record.labels,
        expire_time=record.expire_time,
        node=record.node,
        network_policy=convert(record.network_policy, sandbox_pb2.NetworkPolicy),
        create_time=record.create_time,
        update_time=record.update_time,
        source_snapshot=f"snapshots/{record.source_snapshot}" if record.source_snapshot else "",
        exposed_ports=[convert(p, sandbox_pb2.ExposedPort) for p in record.exposed_ports],
        ip_address=record.ip_address,
        failure_message=record.failure_message,
        hypervisor=record.hypervisor,
        node_selector=record.node_selector,
        env=record.env,
    )
    if record.state not in (RUNNING, PAUSED) or not record.node:
        return sandbox
    if not node_alive:
        sandbox.state = sandbox_pb2.SANDBOX_STATE_UNAVAILABLE
        sandbox.failure_message = (
            f"node {record.node} is not answering (its lease ran out); the sandbox comes back when the node does"
        )
    elif vm is None:
        sandbox.state = sandbox_pb2.SANDBOX_STATE_FAILED
        sandbox.failure_message = "the VM record is gone from its node"
    else:
        sandbox.state = VM_TO_SANDBOX[vm.state]
        if vm.state in (vm_pb2.VM_STATE_FAILED, vm_pb2.VM_STATE_STOPPED):
            sandbox.failure_message = vm.failure_message or f"the VM is {vm_pb2.VmState.Name(vm.state)}"
        elif incident is not None and incident.vmm_pid in (0, vm.pid):
            sandbox.state = sandbox_pb2.SANDBOX_STATE_FAILED
            sandbox.failure_message = f"the guest broke the agent protocol and lost its channel: {incident.reason}"
    return sandbox


class SandboxStore:
    """Typed access to sandbox records, scoped to the caller's tenant (another tenant's look absent)."""

    def __init__(self, etcd) -> None:
        self.records = Records(etcd)
        # (tenant, name) -> the node a sandbox was last read on: lets the data plane read the record, its VM and its
        # incident in one round trip. Only a hint: the read checks the record still names that node.
        self.node_hints: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    async def create(self, record: SandboxRecord, *also) -> None:
        """Writes a new record (with `also`, more operations of the same transaction); ALREADY_EXISTS when the id
        is taken."""
        record.update_time.GetCurrentTime()
        if not await self.records.transaction(
            compare=[self.records.unchanged(SANDBOXES, 0, record.id)],
            success=[self.records.put_op(SANDBOXES, record, record.id), *also],
        ):
            raise AlreadyExists(
                f"sandbox {name_of(record)} already exists",
                reason="SANDBOX_EXISTS",
                metadata={"sandbox": f"sandboxes/{name_of(record)}"},
            )

    async def put(self, record: SandboxRecord) -> None:
        record.update_time.GetCurrentTime()
        await self.records.put(SANDBOXES, record, record.id)

    def put_op(self, record: SandboxRecord):
        record.update_time.GetCurrentTime()
        return self.records.put_op(SANDBOXES, record, record.id)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return (await self.get_stored(sandbox_id)).message

    async def get_stored(self, name: str) -> Stored[SandboxRecord]:
        """The caller's sandbox `name` and its revision (for a compare-and-swap); without a caller (the gateway's
        own work), the sandbox with id `name`."""
        if not SANDBOX_ID.fullmatch(name):
            raise not_found(name)
        tenant = current_tenant()
        stored = await self.records.get(SANDBOXES, sandbox_key(tenant, name)) if tenant is not None else None
        if stored is None:
            stored = await self.records.get(SANDBOXES, name)
            # By id: a record from before per-tenant ids (id == name), or the gateway's own lookup. A cluster id is
            # not a name its tenant may use, and another tenant's sandbox looks exactly like one that does not exist.
            if stored is not None and tenant is not None and (stored.message.tenant != tenant or stored.message.name):
                stored = None
        if stored is None:
            raise await self.gone(tenant, name)
        observability.bind_to_call(sandbox=stored.message.id)  # on every later log line of this call
        return stored

    async def with_vm(self, name: str) -> tuple[SandboxRecord, vm_pb2.VmRecord | None, vm_pb2.ChannelIncident | None]:
        """The caller's sandbox `name` with its VM record and channel incident. Once its node is known from an earlier
        read, the three come in one round trip, as of one revision (a sandbox changes node only when it moves)."""
        tenant = current_tenant()
        node = self.node_hints.get((tenant, name)) if tenant is not None else None
        if node is not None:
            sandbox_id = sandbox_key(tenant, name)
            stored, vm, incident = await self.records.get_many(
                (SANDBOXES, (sandbox_id,)), (VMS, (node, sandbox_id)), (CHANNEL_INCIDENTS, (node, sandbox_id))
            )
            if stored is not None and stored.message.node == node:
                self.node_hints.move_to_end((tenant, name))
                observability.bind_to_call(sandbox=stored.message.id)
                return stored.message, vm and vm.message, incident and incident.message
            self.node_hints.pop((tenant, name), None)
        record = await self.get(name)
        vm, incident = await asyncio.gather(self.vm(record), self.incident(record))
        if tenant is not None and record.id == sandbox_key(tenant, name):
            self.remember_node(record)
        return record, vm, incident

    def remember_node(self, record: SandboxRecord) -> None:
        """Notes the node `record` is placed on (a create's, or one just read): its next read is one round trip."""
        if record.node and record.name:
            self.node_hints[(record.tenant, record.name)] = record.node
            self.node_hints.move_to_end((record.tenant, record.name))
            if len(self.node_hints) > MAX_NODE_HINTS:
                self.node_hints.popitem(last=False)

    async def gone(self, tenant: str | None, name: str) -> NotFound:
        """NOT_FOUND for `name`, saying what became of it if it was the caller's and ended within a day."""
        tombstone = await self.records.get(SANDBOX_TOMBSTONES, sandbox_key(tenant, name)) if tenant else None
        if tombstone is None or tombstone.message.tenant != tenant:
            return not_found(name)
        ended, at = tombstone.message.ended, tombstone.message.end_time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
        what = "its timeout ran out and it was deleted" if ended == "expired" else "it was deleted"
        return NotFound(
            f"sandbox {name} no longer exists: {what} at {at}",
            reason="SANDBOX_NOT_FOUND",
            metadata={"sandbox": f"sandboxes/{name}", "ended": ended, "end_time": at},
        )

    async def get_by_id(self, sandbox_id: str) -> Stored[SandboxRecord]:
        """Any tenant's sandbox by its cluster id (node administration, the reaper); NOT_FOUND when gone."""
        stored = await self.records.get(SANDBOXES, sandbox_id)
        if stored is None:
            raise not_found(sandbox_id)
        return stored

    async def list(self, tenant: str | None = None, every_tenant: bool = False) -> list[SandboxRecord]:
        """The records of `tenant` (default: the caller's tenant when there is one); every tenant's with
        `every_tenant` (placement, the reaper, node administration)."""
        tenant = None if every_tenant else (tenant or current_tenant())
        return [s.message for s in await self.records.list(SANDBOXES) if tenant is None or s.message.tenant == tenant]

    async def delete(self, record: SandboxRecord, ended: str = "deleted") -> None:
        """Deletes the record and leaves its tombstone (`ended`: deleted or expired), in one transaction."""
        tombstone = SandboxTombstone(tenant=record.tenant, name=name_of(record), ended=ended)
        tombstone.end_time.GetCurrentTime()
        await self.records.transaction(
            compare=[],
            success=[
                self.records.delete_op(SANDBOXES, record.id),
                self.records.put_op(SANDBOX_TOMBSTONES, tombstone, record.id),
            ],
        )

    async def sweep_tombstones(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        swept = 0
        for stored in await self.records.list(SANDBOX_TOMBSTONES):
            if stored.message.end_time.ToSeconds() < cutoff:
                await self.records.delete(SANDBOX_TOMBSTONES, *stored.parts)
                swept += 1
        return swept

    async def change(self, record: SandboxRecord, mutate, expect_states=None, revision: int = 0) -> SandboxRecord:
        """Reads `record` again, applies `mutate(record)` and writes it back only if nobody changed it meanwhile
        (retried on a conflict): a change never resurrects a sandbox deleted concurrently, nor undoes another
        change. NOT_FOUND when it is gone; FAILED_PRECONDITION when its state is not in `expect_states`. With the
        `revision` `record` was read or written at, the first try writes without reading it again (a create marking
        its sandbox RUNNING: one round trip, not two); a conflict reads it as usual."""
        sandbox_id, name = record.id, name_of(record)
        known = None
        if revision:
            known = Stored((sandbox_id,), SandboxRecord(), revision)
            known.message.CopyFrom(record)
        for _ in range(50):
            stored = known if known is not None else await self.records.get(SANDBOXES, sandbox_id)
            known = None  # a conflict reads it again
            if stored is None:
                raise not_found(name)
            record = stored.message
            if expect_states is not None and record.state not in expect_states:
                raise FailedPrecondition(
                    f"sandbox {name} is {record_state_name(record.state)}, not in a state that allows this",
                    reason="SANDBOX_STATE_CHANGED",
                    metadata={"sandbox": f"sandboxes/{name}"},
                )
            mutate(record)
            record.update_time.GetCurrentTime()
            if await self.records.transaction(
                compare=[self.records.unchanged(SANDBOXES, stored.revision, sandbox_id)],
                success=[self.records.put_op(SANDBOXES, record, sandbox_id)],
            ):
                return record
        raise Aborted(f"sandbox {name} is changing too fast; retry", reason="SANDBOX_CONTENDED")

    async def remove(self, record: SandboxRecord, revision: int) -> bool:
        """Deletes the record if it is still as read."""
        return await self.records.transaction(
            compare=[self.records.unchanged(SANDBOXES, revision, record.id)],
            success=[self.records.delete_op(SANDBOXES, record.id)],
        )

    async def vm(self, record: SandboxRecord) -> vm_pb2.VmRecord | None:
        if not record.node:
            return None
        stored = await self.records.get(VMS, record.node, record.id)
        return stored.message if stored else None

    async def incident(self, record: SandboxRecord) -> vm_pb2.ChannelIncident | None:
        if not record.node:
            return None
        stored = await self.records.get(CHANNEL_INCIDENTS, record.node, record.id)
        return stored.message if stored else None

    async def incidents(self) -> dict[tuple[str, str], vm_pb2.ChannelIncident]:
        return {s.parts: s.message for s in await self.records.list(CHANNEL_INCIDENTS)}

    async def vms(self) -> dict[tuple[str, str], vm_pb2.VmRecord]:
        """Every VM record of the cluster by (node, id)."""
        return {s.parts: s.message for s in await self.records.list(VMS)}
