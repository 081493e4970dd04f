"""CreateSnapshot, GetSnapshot, ListSnapshots, DeleteSnapshot, RestoreSnapshot, ForkSandbox.

The snapshot service stores artifacts and lineage; compute freezes and restores VMs; the gateway ties them
together. Integrity is checked before every restore: a corrupt snapshot is refused with DATA_LOSS and never
booted. Every restored or forked guest gets a fresh identity (host name, reseeded kernel RNG).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog

from microvm.auth.v1 import auth_pb2
from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.gateway.access import current_tenant
from services.gateway.lifecycle import parse_name, validate_labels

log = structlog.get_logger()
MAX_FORK = 64
SNAPSHOT_DISK_ALLOWANCE_MIB = 1024


def to_public(record: snapshot_pb2.SnapshotRecord) -> sandbox_pb2.Snapshot:
    snapshot = sandbox_pb2.Snapshot(
        name=f"snapshots/{record.id}",
        source_sandbox=f"sandboxes/{record.source_sandbox}",
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
    return snapshot


class SnapshotHandlers:
    """Mixin of SandboxServicer."""

    def snapshot_store(self) -> snapshot_pb2_grpc.SnapshotStoreServiceStub:
        return snapshot_pb2_grpc.SnapshotStoreServiceStub(self.placement.channel_to("snapshot"))

    async def take_snapshot(self, sandbox_name: str, labels, ttl_seconds: int = 0) -> snapshot_pb2.SnapshotRecord:
        record = await self.store.get(parse_name(sandbox_name))
        if record.sandbox.state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED):
            raise FailedPrecondition(
                f"sandbox {record.id} is {sandbox_pb2.SandboxState.Name(record.sandbox.state)}",
                reason="SANDBOX_NOT_RUNNING",
            )
        validate_labels(labels)
        snapshot_id = f"snap-{uuid.uuid4().hex[:12]}"
        # Charged at the most a snapshot of this guest can store: its RAM plus a disk allowance.
        await self.reserve_quota(
            record.tenant,
            f"snapshot-{snapshot_id}",
            auth_pb2.QuotaAmount(snapshot_bytes=(record.sandbox.memory_mib + SNAPSHOT_DISK_ALLOWANCE_MIB) << 20),
        )
        try:
            await self.placement.compute(record.node).SnapshotVm(
                compute_pb2.SnapshotVmRequest(vm_id=record.id, snapshot_id=snapshot_id), timeout=600
            )
        except BaseException:
            await self.release_quota(record.tenant, f"snapshot-{snapshot_id}")
            raise
        parent = record.sandbox.source_snapshot.removeprefix("snapshots/")
        snapshot = snapshot_pb2.SnapshotRecord(
            id=snapshot_id,
            tenant=record.tenant,
            source_sandbox=record.id,
            parent_snapshot=parent,
            template=record.sandbox.template,
            labels=labels,
            vcpus=record.sandbox.vcpus,
            memory_mib=record.sandbox.memory_mib,
        )
        snapshot.create_time.GetCurrentTime()
        if ttl_seconds:
            snapshot.expire_time.FromSeconds(int(time.time()) + ttl_seconds)
        committed = await self.snapshot_store().CommitSnapshot(
            snapshot_pb2.CommitSnapshotRequest(record=snapshot), timeout=30
        )
        log.info("snapshot_created", snapshot=snapshot_id, sandbox=record.id, parent=parent)
        return committed.record

    async def CreateSnapshot(self, request, context):
        ttl = request.ttl.seconds if request.HasField("ttl") else 0
        if ttl < 0:
            raise InvalidArgument("ttl must not be negative")
        return api.CreateSnapshotResponse(
            snapshot=to_public(await self.take_snapshot(request.sandbox, request.labels, ttl))
        )

    async def snapshot_record(self, snapshot_id: str) -> snapshot_pb2.SnapshotRecord:
        """The record, if it is the caller's tenant's; another tenant's snapshot is NOT_FOUND."""
        try:
            record = (
                await self.snapshot_store().GetSnapshotRecord(
                    snapshot_pb2.GetSnapshotRecordRequest(id=snapshot_id), timeout=10
                )
            ).record
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                record = None
            else:
                raise
        tenant = current_tenant()
        if record is None or (tenant is not None and record.tenant != tenant):
            raise NotFound(
                f"snapshot {snapshot_id} does not exist",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"snapshot": f"snapshots/{snapshot_id}"},
            )
        return record

    async def GetSnapshot(self, request, context):
        return api.GetSnapshotResponse(
            snapshot=to_public(await self.snapshot_record(parse_name(request.name, "snapshots")))
        )

    async def ListSnapshots(self, request, context):
        query = snapshot_pb2.ListSnapshotRecordsRequest(
            tenant=current_tenant() or "",
            source_sandbox=parse_name(request.source_sandbox) if request.source_sandbox else "",
            parent_snapshot=parse_name(request.parent_snapshot, "snapshots") if request.parent_snapshot else "",
        )
        records = list((await self.snapshot_store().ListSnapshotRecords(query, timeout=10)).records)
        page_size = min(request.page_size or 50, 1000)
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued") from None
        page = records[offset : offset + page_size]
        token = str(offset + page_size) if offset + page_size < len(records) else ""
        return api.ListSnapshotsResponse(snapshots=[to_public(r) for r in page], next_page_token=token)

    async def DeleteSnapshot(self, request, context):
        record = await self.snapshot_record(parse_name(request.name, "snapshots"))
        await self.snapshot_store().DeleteSnapshotRecord(
            snapshot_pb2.DeleteSnapshotRecordRequest(id=record.id), timeout=10
        )
        await self.release_quota(record.tenant, f"snapshot-{record.id}")
        return api.DeleteSnapshotResponse()

    async def verified_snapshot(self, snapshot_id: str) -> snapshot_pb2.SnapshotRecord:
        store = self.snapshot_store()
        record = await self.snapshot_record(snapshot_id)
        check = await store.VerifySnapshot(snapshot_pb2.VerifySnapshotRequest(id=snapshot_id), timeout=120)
        if not check.ok:
            raise DataLoss(
                f"snapshot {snapshot_id} is corrupt ({len(check.bad_chunks)} bad chunks); it will not be restored",
                reason="SNAPSHOT_CORRUPT",
                metadata={"snapshot": f"snapshots/{snapshot_id}", "bad_chunks": len(check.bad_chunks)},
            )
        return record

    async def restore_into_new_sandbox(
        self, snapshot: snapshot_pb2.SnapshotRecord, labels, timeout_seconds: int, policy: sandbox_pb2.NetworkPolicy
    ) -> sandbox_pb2.Sandbox:
        """A new sandbox from `snapshot`, with its own address (never its source's) and `policy`."""
        sandbox_id = f"sbx-{uuid.uuid4().hex[:12]}"
        sandbox = sandbox_pb2.Sandbox(
            template=snapshot.template,
            vcpus=snapshot.vcpus,
            memory_mib=snapshot.memory_mib,
            labels=labels,
            source_snapshot=f"snapshots/{snapshot.id}",
            network_policy=policy,
        )

        record = await self.start_sandbox(
            sandbox_id,
            sandbox,
            timeout_seconds,
            lambda compute: compute.RestoreVm(
                compute_pb2.RestoreVmRequest(
                    vm_id=sandbox_id, snapshot_id=snapshot.id, hostname=sandbox_id, network_policy=policy
                ),
                timeout=600,
            ),
        )
        return record.sandbox

    async def RestoreSnapshot(self, request, context):
        validate_labels(request.sandbox.labels)
        timeout = self._timeout_seconds(request.sandbox.timeout if request.sandbox.HasField("timeout") else None)
        policy = self.checked_policy(request.sandbox.network_policy)
        snapshot = await self.verified_snapshot(parse_name(request.snapshot, "snapshots"))
        return api.RestoreSnapshotResponse(
            sandbox=await self.restore_into_new_sandbox(snapshot, request.sandbox.labels, timeout, policy)
        )

    async def ForkSandbox(self, request, context):
        count = request.count or 1
        if not 1 <= count <= MAX_FORK:
            raise InvalidArgument(f"count must be between 1 and {MAX_FORK}, got {count}")
        validate_labels(request.labels)
        source = await self.store.get(parse_name(request.name))
        snapshot = await self.take_snapshot(request.name, {"forked-from": source.id})
        snapshot = await self.verified_snapshot(snapshot.id)
        results = await asyncio.gather(
            *(
                self.restore_into_new_sandbox(
                    snapshot, request.labels, source.timeout_seconds, source.sandbox.network_policy
                )
                for _ in range(count)
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # All or nothing: a partial fork would leave the caller with clones it did not ask for.
            for clone in results:
                if not isinstance(clone, BaseException):
                    try:
                        await self.destroy(await self.store.get(clone.name.split("/")[1]))
                    except Exception as exc:
                        log.warning("fork_cleanup_failed", sandbox=clone.name, error=str(exc))
            raise failures[0]
        return api.ForkSandboxResponse(snapshot=to_public(snapshot), sandboxes=results)
