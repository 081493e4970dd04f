"""SandboxEventDeriver: the lifecycle events of sandboxes, derived from the changes of the cluster's records.

Nothing announces an event: each one is read off a change in etcd, against what the records said just before it.

- CREATED: a sandbox record appears (placement).
- STARTED, PAUSED, RESUMED: its `state` goes CREATING -> RUNNING, RUNNING -> PAUSED, PAUSED -> RUNNING (a
  migration's MIGRATING in between is no change).
- DELETED, EXPIRED: the record is deleted in the transaction that writes its tombstone, whose `ended` tells which.
- FAILED then DELETED: the record is deleted without a tombstone while CREATING (its creation failed).
- FAILED: while it is RUNNING or PAUSED on a node, its VM record there turns FAILED or STOPPED or goes away, or that
  node's relay records a channel incident for it (or its own record turns FAILED).
- SNAPSHOTTED: a snapshot record of its tenant naming it as the source appears.
- NODE_LOST: the last compute registration of its node ends (lease out, or stopped) while it is RUNNING or PAUSED
  there.

The same history always gives the same events in the same order (sandboxes of a lost node go by id), so an event's
place (revision, index among its revision's events) is a cursor that means the same thing on every replica and
after every restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from google.protobuf import timestamp_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.types.v1 import event_pb2, vm_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.records import (
    CHANNEL_INCIDENTS,
    SANDBOX_TOMBSTONES,
    SANDBOXES,
    SERVICES,
    SNAPSHOTS,
    VMS,
    RecordCorrupt,
    RecordKind,
)
from services.gateway.event_history import Change, EtcdHistory
from services.gateway.records import SandboxRecord, to_public

log = structlog.get_logger()
E = event_pb2
CREATING = sandbox_types.SANDBOX_RECORD_STATE_CREATING
RUNNING = sandbox_types.SANDBOX_RECORD_STATE_RUNNING
PAUSED = sandbox_types.SANDBOX_RECORD_STATE_PAUSED
FAILED = sandbox_types.SANDBOX_RECORD_STATE_FAILED
PASSING = (sandbox_types.SANDBOX_RECORD_STATE_MIGRATING, sandbox_types.SANDBOX_RECORD_STATE_DELETING)
TRANSITIONS = {(CREATING, RUNNING): E.SANDBOX_EVENT_TYPE_STARTED, (RUNNING, PAUSED): E.SANDBOX_EVENT_TYPE_PAUSED}
TRANSITIONS[(PAUSED, RUNNING)] = E.SANDBOX_EVENT_TYPE_RESUMED
DEAD_VM = (vm_pb2.VM_STATE_FAILED, vm_pb2.VM_STATE_STOPPED)
# The one key range holding every record events are derived from (channel incidents, services, sandboxes and their
# tombstones, snapshots, VMs); what else lies in it (nodes, templates, placements) is read past.
WATCHED = (b"/microvm/channel-incidents/", b"/microvm/vms0")


@dataclass
class Derived:
    """One event: its kind, the sandbox as it was, what GetSandbox would have said of it then."""

    type: int
    record: SandboxRecord
    state: int
    time: timestamp_pb2.Timestamp
    message: str = ""
    snapshot: str = ""


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _decode(kind: RecordKind, change: Change):
    try:
        return kind.decode(change.value, change.key)
    except RecordCorrupt as exc:
        log.error("event_record_unreadable", key=change.key.decode(errors="replace"), error=str(exc))
        return None


@dataclass
class SandboxEventDeriver:
    """What the records said at one revision (of the sandboxes of `tenant`, every tenant's when None), moved forward
    one revision at a time by `apply`, which returns that revision's events."""

    tenant: str | None
    sandboxes: dict[str, SandboxRecord] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)  # last state that was not MIGRATING or DELETING
    vms: dict[tuple[str, str], vm_pb2.VmRecord] = field(default_factory=dict)
    computes: dict[str, str] = field(default_factory=dict)  # compute instance -> its node
    failed: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)

    def _mine(self, record: SandboxRecord) -> bool:
        return self.tenant is None or record.tenant == self.tenant

    async def load(self, history: EtcdHistory, revision: int) -> None:
        """The records as they were at `revision` (Compacted when etcd no longer keeps it)."""

        async def read(kind: RecordKind, *scope: str) -> list[tuple[tuple[str, ...], object]]:
            start = kind.scope(*scope)
            found = []
            for kv in await history.read(start, start[:-1] + b"0", revision):
                parts = kind.parts_of(kv.key)
                message = _decode(kind, Change(revision, kv.key, kv.value, False)) if parts else None
                if message is not None:
                    found.append((parts, message))
            return found

        for (sandbox_id,), record in await read(SANDBOXES):
            if self._mine(record):
                self.sandboxes[sandbox_id] = record
                if record.state not in PASSING:
                    self.settled[sandbox_id] = record.state
        for (_, instance), registration in await read(SERVICES, "compute"):
            self.computes[instance] = registration.node
        for (node, vm_id), vm in await read(VMS):
            if vm_id in self.sandboxes:
                self.vms[(node, vm_id)] = vm
        for sandbox_id, record in self.sandboxes.items():
            vm = self.vms.get((record.node, sandbox_id))
            if record.state == FAILED or (record.state in (RUNNING, PAUSED) and vm is not None and vm.state in DEAD_VM):
                self.failed.add(sandbox_id)
            elif record.node and not self.alive(record.node):
                self.lost.add(sandbox_id)

    def alive(self, node: str) -> bool:
        return node in self.computes.values()

    def _event(self, kind: int, record: SandboxRecord, time=None, message: str = "", snapshot: str = "") -> Derived:
        gone = kind in (E.SANDBOX_EVENT_TYPE_DELETED, E.SANDBOX_EVENT_TYPE_EXPIRED)
        state = sandbox_pb2.SANDBOX_STATE_UNSPECIFIED
        if not gone:
            vm = self.vms.get((record.node, record.id))
            state = to_public(record, vm, self.alive(record.node)).state
            if kind == E.SANDBOX_EVENT_TYPE_FAILED:
                state = sandbox_pb2.SANDBOX_STATE_FAILED
        return Derived(kind, record, state, time if time is not None else _now(), message, snapshot)

    def apply(self, revision: int, changes: list[Change]) -> list[Derived]:
        """The events of one revision (all of its changes, in order)."""
        events: list[Derived] = []
        for change in changes:
            if (parts := SANDBOXES.parts_of(change.key)) is not None:
                events += self._sandbox(parts[0], change, changes)
            elif (parts := VMS.parts_of(change.key)) is not None:
                events += self._vm(parts, change)
            elif (parts := CHANNEL_INCIDENTS.parts_of(change.key)) is not None:
                events += self._incident(parts, change)
            elif (parts := SERVICES.parts_of(change.key)) is not None and parts[0] == "compute":
                events += self._registration(parts[1], change)
            elif (parts := SNAPSHOTS.parts_of(change.key)) is not None and change.created:
                events += self._snapshot(parts[0], change)
        return events

    def _sandbox(self, sandbox_id: str, change: Change, changes: list[Change]) -> list[Derived]:
        if change.value is None:
            return self._removed(sandbox_id, changes)
        record = _decode(SANDBOXES, change)
        if record is None or not self._mine(record):
            return []
        before, self.sandboxes[sandbox_id] = self.sandboxes.get(sandbox_id), record
        if before is None:
            self.settled[sandbox_id] = record.state
            if not change.created:
                return []  # not ours until now (cannot happen: a tenant never changes); nothing to compare with
            events = [self._event(E.SANDBOX_EVENT_TYPE_CREATED, record, record.create_time)]
            if record.state == RUNNING:
                events.append(self._event(E.SANDBOX_EVENT_TYPE_STARTED, record, record.update_time))
            return events
        if record.state in PASSING:
            return []
        settled, self.settled[sandbox_id] = self.settled.get(sandbox_id, before.state), record.state
        if record.state == FAILED and settled != FAILED and sandbox_id not in self.failed:
            self.failed.add(sandbox_id)
            return [self._event(E.SANDBOX_EVENT_TYPE_FAILED, record, record.update_time, record.failure_message)]
        kind = TRANSITIONS.get((settled, record.state))
        return [self._event(kind, record, record.update_time)] if kind else []

    def _removed(self, sandbox_id: str, changes: list[Change]) -> list[Derived]:
        record = self.sandboxes.pop(sandbox_id, None)
        settled = self.settled.pop(sandbox_id, None)
        self.failed.discard(sandbox_id)
        self.lost.discard(sandbox_id)
        for key in [key for key in self.vms if key[1] == sandbox_id]:
            del self.vms[key]
        if record is None:
            return []
        tombstone_key = SANDBOX_TOMBSTONES.key(sandbox_id)
        tombstone = next((c for c in changes if c.key == tombstone_key and c.value is not None), None)
        if tombstone is not None and (ended := _decode(SANDBOX_TOMBSTONES, tombstone)) is not None:
            kind = E.SANDBOX_EVENT_TYPE_EXPIRED if ended.ended == "expired" else E.SANDBOX_EVENT_TYPE_DELETED
            return [self._event(kind, record, ended.end_time)]
        if CREATING in (record.state, settled):
            now = _now()
            return [
                self._event(E.SANDBOX_EVENT_TYPE_FAILED, record, now, "its creation failed"),
                self._event(E.SANDBOX_EVENT_TYPE_DELETED, record, now, "removed after its creation failed"),
            ]
        return [self._event(E.SANDBOX_EVENT_TYPE_DELETED, record)]

    def _running_on(self, sandbox_id: str, node: str) -> SandboxRecord | None:
        record = self.sandboxes.get(sandbox_id)
        if record is None or record.node != node or record.state not in (RUNNING, PAUSED):
            return None
        return record if sandbox_id not in self.failed else None

    def _fail(self, record: SandboxRecord, time, message: str) -> list[Derived]:
        self.failed.add(record.id)
        return [self._event(E.SANDBOX_EVENT_TYPE_FAILED, record, time, message)]

    def _vm(self, parts: tuple[str, str], change: Change) -> list[Derived]:
        node, vm_id = parts
        if vm_id not in self.sandboxes:
            return []
        if change.value is None:
            self.vms.pop(parts, None)
            record = self._running_on(vm_id, node)
            return self._fail(record, None, "the VM record is gone from its node") if record else []
        vm = _decode(VMS, change)
        if vm is None:
            return []
        self.vms[parts] = vm
        record = self._running_on(vm_id, node)
        if record is None or vm.state not in DEAD_VM:
            return []
        reason = vm.failure_message or f"the VM is {vm_pb2.VmState.Name(vm.state).removeprefix('VM_STATE_')}"
        return self._fail(record, vm.update_time if vm.HasField("update_time") else None, reason)

    def _incident(self, parts: tuple[str, str], change: Change) -> list[Derived]:
        node, vm_id = parts
        record = self._running_on(vm_id, node) if change.value is not None else None
        incident = _decode(CHANNEL_INCIDENTS, change) if record else None
        vm = self.vms.get(parts)
        if incident is None or incident.vmm_pid not in (0, vm.pid if vm else 0):
            return []
        message = f"the guest broke the agent protocol and lost its channel: {incident.reason}"
        return self._fail(record, incident.time, message)

    def _registration(self, instance: str, change: Change) -> list[Derived]:
        if change.value is not None:
            registration = _decode(SERVICES, change)
            if registration is not None:
                self.computes[instance] = registration.node
                self.lost -= {i for i, r in self.sandboxes.items() if r.node == registration.node}
            return []
        node = self.computes.pop(instance, "")
        if not node or self.alive(node):
            return []
        events = []
        message = f"node {node} is not answering (its compute registration ended); the sandbox comes back with it"
        for sandbox_id in sorted(self.sandboxes):
            record = self._running_on(sandbox_id, node)
            if record is not None and sandbox_id not in self.lost:
                self.lost.add(sandbox_id)
                events.append(self._event(E.SANDBOX_EVENT_TYPE_NODE_LOST, record, None, message))
        return events

    def _snapshot(self, snapshot_id: str, change: Change) -> list[Derived]:
        snapshot = _decode(SNAPSHOTS, change)
        if snapshot is None or not snapshot.tenant:  # a migration's own snapshot is nobody's event
            return []
        record = self.sandboxes.get(snapshot.source_sandbox)
        if record is None:
            return []
        return [
            self._event(
                E.SANDBOX_EVENT_TYPE_SNAPSHOTTED, record, snapshot.create_time, snapshot=f"snapshots/{snapshot_id}"
            )
        ]
