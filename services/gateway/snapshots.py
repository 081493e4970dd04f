"""SnapshotOps: CreateSnapshot, GetSnapshot, ListSnapshots, DeleteSnapshot, RestoreSnapshot, ForkSandbox.

A snapshot is frozen by the compute service of the sandbox's node into that node's snapshot store; its record is
cluster-wide and says which nodes hold it. A restore or fork lands wherever placement puts it; that node's store
fetches the chunks it lacks from a holder. Integrity is checked before every restore: a corrupt snapshot is
refused with DATA_LOSS and never booted. Every restored or forked guest gets a fresh identity.
"""

from __future__ import annotations

import time
import uuid

import grpc
import structlog

from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.snapshot.v1 import snapshot_pb2
from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from services.common import deadlines
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.common.validation import check_page_size
from services.gateway.access import current_tenant
from services.gateway.forks import fork_sandbox
from services.gateway.records import MIGRATING, PAUSED, RUNNING, SandboxRecord, name_of, sandbox_key, state_name
from services.gateway.sandbox_requests import parse_name, validate_labels
from services.gateway.sandboxes import Sandboxes

log = structlog.get_logger()
SNAPSHOT_DISK_ALLOWANCE_MIB = 1024


def to_public(record: SnapshotRecord) -> sandbox_pb2.Snapshot:
    snapshot = sandbox_pb2.Snapshot(
        name=f"snapshots/{record.id}",
        source_sandbox=f"sandboxes/{record.source_sandbox_name or record.source_sandbox}",
        parent_snapshot=f"snapshots/{record.parent_snapshot}" if record.parent_snapshot else "",
        template=record.template,
        state=sandbox_pb2.SNAPSHOT_STATE_READY,
        size_bytes=sum(a.size_bytes for a in record.artifacts),
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        labels=record.labels,
        create_time=record.create_time,
    )
    if record.HasField("expire_time"):
        snapshot.expire_time.CopyFrom(record.expire_time)
    if record.template_build:
        snapshot.template_build = f"templates/{record.template.partition(':')[0]}/builds/{record.template_build}"
    return snapshot


def snapshot_of(record: SandboxRecord, snapshot_id: str, owner: str, labels) -> SnapshotRecord:
    """The record of a snapshot of `record`'s sandbox taken now: what a restore needs to make a sandbox like it."""
    snapshot = SnapshotRecord(
        id=snapshot_id,
        tenant=owner,
        source_sandbox=record.id,
        source_sandbox_name=name_of(record),
        parent_snapshot=record.source_snapshot,
        template=record.template,
        labels=labels,
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        sandbox_labels=record.labels,
        sandbox_env=record.env,
        template_build=record.template_build,
        image=record.image,
        default_cwd=record.default_cwd,
        default_user=record.default_user,
    )
    snapshot.create_time.GetCurrentTime()
    return snapshot


class SnapshotOps:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes, self.nodes, self.quotas = sandboxes, sandboxes.nodes, sandboxes.quotas

    async def take(
        self,
        record: SandboxRecord,
        labels,
        ttl_seconds: int = 0,
        tenant: str | None = None,
        leave_paused: bool = False,
        share_memory: bool = False,
    ) -> SnapshotRecord:
        """Freezes the sandbox on its node and commits the record. `tenant` "" makes a node-internal snapshot (a
        migration's), charged to no quota. `share_memory`: restores of it follow (SnapshotVmRequest.share_memory)."""
        await self._require_running(record)
        validate_labels(labels)
        snapshot_id = f"snap-{uuid.uuid4().hex[:12]}"
        owner = record.tenant if tenant is None else tenant
        # Charged at the most a snapshot of this guest can store: its RAM plus a disk allowance.
        if owner:
            await self.quotas.reserve(
                owner,
                f"snapshot-{snapshot_id}",
                auth_types.QuotaAmount(snapshot_bytes=(record.memory_mib + SNAPSHOT_DISK_ALLOWANCE_MIB) << 20),
            )
        try:
            freeze = compute_pb2.SnapshotVmRequest(
                vm_id=record.id, snapshot_id=snapshot_id, leave_paused=leave_paused, share_memory=share_memory
            )
            await self.nodes.on_compute(record.node, lambda c: c.SnapshotVm(freeze, timeout=deadlines.SNAPSHOT))
            snapshot = snapshot_of(record, snapshot_id, owner, labels)
            if ttl_seconds:
                snapshot.expire_time.FromSeconds(int(time.time()) + ttl_seconds)
            commit = snapshot_pb2.CommitSnapshotRequest(record=snapshot)
            committed = await self.nodes.on_snapshot_store(
                record.node, lambda s: s.CommitSnapshot(commit, timeout=deadlines.CONTROL)
            )
        except BaseException:
            if owner:
                await self.quotas.release(owner, f"snapshot-{snapshot_id}")
            raise
        log.info("snapshot_created", snapshot=snapshot_id, sandbox=record.id, node=record.node)
        return committed.record

    async def take_here(self, record: SandboxRecord, labels, share_memory: bool) -> SnapshotRecord:
        """A snapshot that stays on the sandbox's node (SnapshotVmRequest.local_only): frozen there, never uploaded,
        no record committed. What a fork that keeps no snapshot restores its clones from, on that node."""
        await self._require_running(record)
        snapshot_id = f"snap-{uuid.uuid4().hex[:12]}"
        freeze = compute_pb2.SnapshotVmRequest(
            vm_id=record.id, snapshot_id=snapshot_id, share_memory=share_memory, local_only=True
        )
        await self.nodes.on_compute(record.node, lambda c: c.SnapshotVm(freeze, timeout=deadlines.SNAPSHOT))
        log.info("snapshot_kept_on_node", snapshot=snapshot_id, sandbox=record.id, node=record.node)
        snapshot = snapshot_of(record, snapshot_id, record.tenant, labels)
        snapshot.holder_nodes.append(record.node)
        return snapshot

    async def _require_running(self, record: SandboxRecord) -> None:
        if record.state not in (RUNNING, PAUSED, MIGRATING) or not self.nodes.alive(record.node):
            sandbox = await self.sandboxes.view(record)
            raise FailedPrecondition(
                f"sandbox {name_of(record)} is {state_name(sandbox.state)}", reason="SANDBOX_NOT_RUNNING"
            )

    async def create(self, request: api.CreateSnapshotRequest) -> sandbox_pb2.Snapshot:
        ttl = request.ttl.seconds if request.HasField("ttl") else 0
        if ttl < 0:
            raise InvalidArgument("ttl must not be negative")
        record = await self.sandboxes.store.get(parse_name(request.sandbox))
        return to_public(await self.take(record, request.labels, ttl))

    async def record(self, snapshot_id: str) -> SnapshotRecord:
        """The record, if it is the caller's tenant's; another tenant's snapshot is NOT_FOUND."""
        try:
            record = (
                await self.nodes.snapshot_store().GetSnapshotRecord(
                    snapshot_pb2.GetSnapshotRecordRequest(id=snapshot_id), timeout=deadlines.QUICK
                )
            ).record
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            record = None
        tenant = current_tenant()
        if record is None or (tenant is not None and record.tenant != tenant):
            raise NotFound(
                f"snapshot {snapshot_id} does not exist",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"snapshot": f"snapshots/{snapshot_id}"},
            )
        return record

    async def get(self, name: str) -> sandbox_pb2.Snapshot:
        return to_public(await self.record(parse_name(name, "snapshots")))

    async def list(self, request: api.ListSnapshotsRequest) -> api.ListSnapshotsResponse:
        tenant = current_tenant() or ""
        parent = parse_name(request.parent_snapshot, "snapshots") if request.parent_snapshot else ""
        # A sandbox's snapshots are stored under its cluster id (and, before per-tenant ids, under its name).
        sources = [""]
        if request.source_sandbox:
            name = parse_name(request.source_sandbox)
            sources = [sandbox_key(tenant, name), name]
        records, seen = [], set()
        for source in sources:
            query = snapshot_pb2.ListSnapshotRecordsRequest(
                tenant=tenant, source_sandbox=source, parent_snapshot=parent
            )
            reply = await self.nodes.snapshot_store().ListSnapshotRecords(query, timeout=deadlines.QUICK)
            records += [r for r in reply.records if r.id not in seen and not seen.add(r.id)]
        page_size = check_page_size(request.page_size)
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued") from None
        page = records[offset : offset + page_size]
        token = str(offset + page_size) if offset + page_size < len(records) else ""
        return api.ListSnapshotsResponse(snapshots=[to_public(r) for r in page], next_page_token=token)

    async def delete(self, name: str) -> None:
        record = await self.record(parse_name(name, "snapshots"))
        await self.forget(record)

    async def forget(self, record: SnapshotRecord) -> None:
        await self.nodes.snapshot_store().DeleteSnapshotRecord(
            snapshot_pb2.DeleteSnapshotRecordRequest(id=record.id), timeout=deadlines.QUICK
        )
        if record.tenant:
            await self.quotas.release(record.tenant, f"snapshot-{record.id}")

    async def verified(self, snapshot_id: str, record: SnapshotRecord | None = None) -> SnapshotRecord:
        """The record once a node that holds it found every chunk intact."""
        record = record or await self.record(snapshot_id)
        store = self.nodes.snapshot_store(list(record.holder_nodes))
        check = await store.VerifySnapshot(
            snapshot_pb2.VerifySnapshotRequest(id=snapshot_id), timeout=deadlines.SNAPSHOT
        )
        if not check.ok:
            raise DataLoss(
                f"snapshot {snapshot_id} is corrupt ({len(check.bad_chunks)} bad chunks); it will not be restored",
                reason="SNAPSHOT_CORRUPT",
                metadata={"snapshot": f"snapshots/{snapshot_id}", "bad_chunks": len(check.bad_chunks)},
            )
        return record

    async def restore_into_new_sandbox(
        self,
        snapshot: SnapshotRecord,
        labels,
        timeout_seconds: int,
        policy: network_types.NetworkPolicy,
        node_selector=None,
        share_memory: bool = False,
        kept_on: str = "",
    ) -> sandbox_pb2.Sandbox:
        """A new sandbox from `snapshot`, with its own address (never its source's) and `policy`, on whichever
        node placement picks (that node fetches the snapshot if it does not hold it). It has its source's labels
        with `labels` on top, and its source's environment (its processes were started with it). `share_memory`:
        more restores of `snapshot` follow (RestoreVmRequest.share_memory). `kept_on`: the node that kept the
        snapshot to itself (`take_here`), where the sandbox must go."""
        name = f"sbx-{uuid.uuid4().hex[:12]}"
        merged = {**snapshot.sandbox_labels, **labels}
        validate_labels(merged)
        record = self.sandboxes.new_record(
            name,
            snapshot.template,
            snapshot.vcpus,
            snapshot.memory_mib,
            merged,
            timeout_seconds,
            policy,
            node_selector,
            source_snapshot=snapshot.id,
            env=snapshot.sandbox_env,
        )
        record.template_build, record.image = snapshot.template_build, snapshot.image
        record.default_cwd, record.default_user = snapshot.default_cwd, snapshot.default_user

        async def restore_vm(node: str):
            request = compute_pb2.RestoreVmRequest(
                vm_id=record.id,
                snapshot_id=snapshot.id,
                hostname=name,
                network_policy=policy,
                share_memory=share_memory,
                local_snapshot=bool(kept_on),
            )
            return (await self.nodes.on_compute(node, lambda c: c.RestoreVm(request, timeout=deadlines.SNAPSHOT))).vm

        return await self.sandboxes.start(record, restore_vm, only_node=kept_on)

    async def restore(self, request: api.RestoreSnapshotRequest) -> sandbox_pb2.Sandbox:
        validate_labels(request.sandbox.labels)
        validate_labels(request.sandbox.node_selector, "node selector", most=16)
        timeout = self.sandboxes.timeout_seconds(
            request.sandbox.timeout if request.sandbox.HasField("timeout") else None
        )
        policy = self.sandboxes.checked_policy(request.sandbox.network_policy)
        snapshot = await self.verified(parse_name(request.snapshot, "snapshots"))
        return await self.restore_into_new_sandbox(
            snapshot, request.sandbox.labels, timeout, policy, request.sandbox.node_selector
        )

    async def fork(self, request: api.ForkSandboxRequest) -> api.ForkSandboxResponse:
        return await fork_sandbox(self, request)
