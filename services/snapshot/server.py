"""Wiring and handlers of the snapshot store (SnapshotStoreService): one per node, for that node's chunks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import structlog

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.common import deadlines
from services.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from services.common.records import PENDING_ARTIFACTS, QUOTA_RELEASES, SNAPSHOTS, Records
from services.common.server import ServiceContext
from services.common.settings import SnapshotSettings
from services.snapshot.metrics import SnapshotMetrics
from services.snapshot.store import SnapshotChunkStore

log = structlog.get_logger()
MAX_ZERO_RUN = 1 << 40


class SnapshotStoreServicer(snapshot_pb2_grpc.SnapshotStoreServiceServicer):
    def __init__(
        self, store: SnapshotChunkStore, settings: SnapshotSettings, release_quotas=None, read_remote_chunks=None
    ) -> None:
        self.store = store
        self.settings = settings
        self.release_quotas = release_quotas
        # (node, digests) -> async iterator of (digest, data) from that node's store.
        self.read_remote_chunks = read_remote_chunks

    async def PutArtifact(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "header":
            raise InvalidArgument("the first PutArtifact message must carry the header")
        header = first.header
        if not header.snapshot_id or not header.name:
            raise InvalidArgument("header.snapshot_id and header.name are required")

        async def data():
            async for message in request_iterator:
                if message.WhichOneof("request") == "zero_bytes":
                    if not 1 <= message.zero_bytes <= MAX_ZERO_RUN:
                        raise InvalidArgument(f"zero_bytes must be between 1 and 2^40, got {message.zero_bytes}")
                    yield message.zero_bytes
                elif message.WhichOneof("request") == "header":
                    raise InvalidArgument("PutArtifact carries one header, in its first message")
                else:
                    yield message.data

        artifact, new_bytes = await self.store.put_artifact(header.snapshot_id, header.name, data())
        return snapshot_pb2.PutArtifactResponse(artifact=artifact, new_bytes=new_bytes)

    async def GetArtifact(self, request, context):
        record = await self.store.get(request.snapshot_id)
        if self.store.missing_chunks(record):
            if self.read_remote_chunks is None:
                raise DataLoss(f"snapshot {record.id} is not held on this node", reason="CHUNK_MISSING")
            await self.store.fetch_missing(record, self.read_remote_chunks)
        async for data in self.store.read_artifact(record, request.name):
            for offset in range(0, len(data), 1 << 20):
                yield snapshot_pb2.GetArtifactResponse(data=data[offset : offset + (1 << 20)])

    async def ReadChunks(self, request, context):
        if len(request.sha256) > 1024:
            raise InvalidArgument("at most 1024 chunks per ReadChunks call")
        for digest in request.sha256:
            if not self.store.chunk_path(digest).exists():
                raise NotFound(
                    f"chunk {digest} is not on node {self.store.node}",
                    reason="CHUNK_NOT_HELD",
                    metadata={"chunk": digest},
                )
            data = await asyncio.to_thread(self.store.read_chunk, digest)
            yield snapshot_pb2.ReadChunksResponse(sha256=digest, data=data)

    async def CommitSnapshot(self, request, context):
        return snapshot_pb2.CommitSnapshotResponse(record=await self.store.commit(request.record))

    async def GetSnapshotRecord(self, request, context):
        return snapshot_pb2.GetSnapshotRecordResponse(record=await self.store.get(request.id))

    async def ListSnapshotRecords(self, request, context):
        records = [
            r
            for r in await self.store.all()
            if (not request.tenant or r.tenant == request.tenant)
            and (not request.source_sandbox or r.source_sandbox == request.source_sandbox)
            and (not request.parent_snapshot or r.parent_snapshot == request.parent_snapshot)
            and (not request.root_snapshot or r.root_snapshot == request.root_snapshot)
        ]
        return snapshot_pb2.ListSnapshotRecordsResponse(records=records)

    async def DeleteSnapshotRecord(self, request, context):
        await self.store.delete(request.id)
        return snapshot_pb2.DeleteSnapshotRecordResponse()

    async def VerifySnapshot(self, request, context):
        bad = await self.store.verify(await self.store.get(request.id))
        return snapshot_pb2.VerifySnapshotResponse(ok=not bad, bad_chunks=bad)

    async def CollectGarbage(self, request, context):
        response = await self.store.collect_garbage(self.settings.keep_last_per_sandbox)
        if self.release_quotas is not None:
            try:
                await self.release_quotas()
            except Exception as exc:  # retried in the background; the collection itself is done
                log.warning("snapshot_quota_release_deferred", error=str(exc))
        return response

    async def GetStorageUsage(self, request, context):
        return await self.store.usage(request.tenant)


async def wire(server, context: ServiceContext[SnapshotSettings]) -> list[str]:
    settings = context.settings
    root = Path(settings.store_dir) if settings.store_dir else Path(context.common.state_dir) / "snapshot"
    node = context.common.node
    store = SnapshotChunkStore(root, context.etcd, settings.chunk_size_bytes, node)
    SnapshotMetrics(context.metrics, store)
    records = Records(context.etcd)
    for kind in (SNAPSHOTS, PENDING_ARTIFACTS, QUOTA_RELEASES):
        await records.migrate(kind)

    async def read_remote_chunks(holder: str, digests: list[str]):
        """Chunks from the snapshot store of node `holder` (mutual TLS, like every internal call)."""
        try:
            instance = context.directory.newest("snapshot", holder)
        except Unavailable:
            raise Unavailable(
                f"node {holder} has no snapshot service registered", reason="SNAPSHOT_HOLDER_UNAVAILABLE"
            ) from None
        stub = snapshot_pb2_grpc.SnapshotStoreServiceStub(context.channel(instance.address))
        try:
            async for chunk in stub.ReadChunks(
                snapshot_pb2.ReadChunksRequest(sha256=digests), timeout=deadlines.TRANSFER
            ):
                yield chunk.sha256, chunk.data
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise Unavailable(f"node {holder}: {exc.details()}", reason="SNAPSHOT_HOLDER_UNAVAILABLE") from None
            raise

    async def release_quotas() -> None:
        """Gives retention-deleted snapshots' storage back to their tenants (ReleaseQuota is idempotent)."""
        pending = await store.pending_releases()
        if not pending:
            return
        auth = auth_pb2_grpc.AuthServiceStub(context.channel(context.directory.newest("auth").address))
        for snapshot_id, tenant in pending.items():
            if tenant:
                await auth.ReleaseQuota(
                    auth_pb2.ReleaseQuotaRequest(tenant=tenant, reservation_id=f"snapshot-{snapshot_id}"),
                    timeout=deadlines.CONTROL,
                )
            await store.released(snapshot_id)
            log.info("snapshot_quota_released", snapshot=snapshot_id, tenant=tenant)

    servicer = SnapshotStoreServicer(store, settings, release_quotas, read_remote_chunks)
    snapshot_pb2_grpc.add_SnapshotStoreServiceServicer_to_server(servicer, server)

    async def collect() -> None:
        await store.collect_garbage(settings.keep_last_per_sandbox)
        await release_quotas()

    context.every(settings.gc_interval_seconds, collect, "snapshot-gc")
    # Releases that failed (auth away) are retried soon, not only at the next sweep.
    context.every(10.0, release_quotas, "snapshot-quota-release")
    return [snapshot_pb2.DESCRIPTOR.services_by_name["SnapshotStoreService"].full_name]
