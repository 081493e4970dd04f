"""SnapshotChunkStore: this node's content-addressed chunks on local disk, and the cluster's snapshot records.

Chunks live at `<store>/chunks/<sha[:2]>/<sha256>`, written to a temporary name and renamed, so a chunk file
is either complete or absent; identical chunks across snapshots are stored once. Every read re-hashes the
chunk: a corrupt or missing chunk is DATA_LOSS and its bytes are never handed out.

etcd (declared records, see docs/etcd-keys.md): `/microvm/snapshots/<id>` -> SnapshotRecord, whose
`holder_nodes` say which nodes' stores hold its chunks; `/microvm/snapshot-artifacts/<id>/<name>` ->
PendingArtifact between PutArtifact and CommitSnapshot. A node that needs a snapshot it does not hold fetches
the missing chunks from a holder (`fetch_missing`), verifies each, keeps them and becomes a holder. Garbage
collection keeps every chunk that any record or pending artifact references.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import structlog

from microvm.snapshot.v1 import snapshot_pb2 as snapshot_api
from microvm.types.v1 import snapshot_pb2
from services.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from services.common.records import PENDING_ARTIFACTS, QUOTA_RELEASES, SNAPSHOTS, Records

log = structlog.get_logger()
FETCH_BATCH = 256


class SnapshotChunkStore:
    def __init__(self, root: Path, etcd, chunk_size: int, node: str = "") -> None:
        self.root = root
        self.chunks = root / "chunks"
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.etcd = etcd
        self.records = Records(etcd)
        self.node = node
        self.chunk_size = chunk_size
        # Chunks of puts still in flight: not referenced by any record yet, but not garbage either.
        self._inflight: dict[int, set[str]] = {}

    def chunk_path(self, digest: str) -> Path:
        return self.chunks / digest[:2] / digest

    # --- chunks ----------------------------------------------------------------------------------
    def _store_chunk(self, data: bytes, digest: str) -> bool:
        """Keeps `data` under its digest unless it is already there; True when it was new."""
        path = self.chunk_path(digest)
        if path.exists():
            return False
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.{time.monotonic_ns()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
        return True

    def read_chunk(self, digest: str) -> bytes:
        try:
            data = self.chunk_path(digest).read_bytes()
        except FileNotFoundError:
            raise DataLoss(
                f"chunk {digest} is missing from the store", reason="CHUNK_MISSING", metadata={"chunk": digest}
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise DataLoss(f"chunk {digest} is corrupt", reason="CHUNK_CORRUPT", metadata={"chunk": digest})
        return data

    async def put_artifact(self, snapshot_id: str, name: str, pieces) -> tuple[snapshot_pb2.Artifact, int]:
        """Stores a stream as chunks; returns the artifact and how many bytes were new. `pieces` yields bytes, or
        an int: that many zero bytes (a hole of a sparse file), stored exactly as the same zeros sent as data but
        never copied or hashed chunk by chunk: every whole chunk of them is the one all-zero chunk."""
        artifact = snapshot_pb2.Artifact(name=name)
        whole = hashlib.sha256()
        buffer = bytearray()
        new_bytes = 0
        inflight = self._inflight.setdefault(id(artifact), set())
        zeros = bytes(self.chunk_size)
        zero_digest = ""

        async def keep(piece: bytes, digest: str) -> None:
            nonlocal new_bytes
            inflight.add(digest)
            fresh = await asyncio.to_thread(self._store_chunk, piece, digest)
            artifact.chunk_sha256.append(digest)
            new_bytes += len(piece) if fresh else 0

        async def flush(final: bool) -> None:
            while len(buffer) >= self.chunk_size or (final and buffer):
                piece = bytes(buffer[: self.chunk_size])
                del buffer[: self.chunk_size]
                await keep(piece, hashlib.sha256(piece).hexdigest())

        async def add_zeros(count: int) -> None:
            nonlocal zero_digest
            artifact.size_bytes += count
            if buffer:  # up to the next chunk boundary, as data
                head = min(count, self.chunk_size - len(buffer))
                buffer.extend(zeros[:head])
                whole.update(zeros[:head])
                count -= head
                await flush(final=False)
            while count >= self.chunk_size:
                zero_digest = zero_digest or hashlib.sha256(zeros).hexdigest()
                whole.update(zeros)
                await keep(zeros, zero_digest)
                count -= self.chunk_size
            buffer.extend(zeros[:count])
            whole.update(zeros[:count])

        try:
            async for piece in pieces:
                if isinstance(piece, int):
                    await add_zeros(piece)
                    continue
                whole.update(piece)
                artifact.size_bytes += len(piece)
                buffer += piece
                await flush(final=False)
            await flush(final=True)
            artifact.sha256 = whole.hexdigest()
            await self.records.put(
                PENDING_ARTIFACTS, snapshot_pb2.PendingArtifact(artifact=artifact, node=self.node), snapshot_id, name
            )
        finally:
            self._inflight.pop(id(artifact), None)
        return artifact, new_bytes

    async def read_artifact(self, record: snapshot_pb2.SnapshotRecord, name: str):
        """Yields the artifact's bytes chunk by chunk, each verified before it is handed out."""
        artifact = next((a for a in record.artifacts if a.name == name), None)
        if artifact is None:
            raise NotFound(f"snapshot {record.id} has no artifact {name!r}", reason="ARTIFACT_NOT_FOUND")
        whole = hashlib.sha256()
        for digest in artifact.chunk_sha256:
            data = await asyncio.to_thread(self.read_chunk, digest)
            whole.update(data)
            yield data
        if whole.hexdigest() != artifact.sha256:
            raise DataLoss(
                f"artifact {name} of snapshot {record.id} does not match its hash", reason="ARTIFACT_CORRUPT"
            )

    async def verify(self, record: snapshot_pb2.SnapshotRecord) -> list[str]:
        """The record's chunks that are missing or corrupt here; each distinct chunk read once (a RAM artifact is
        mostly the one all-zero chunk)."""
        bad = []
        for digest in dict.fromkeys(d for artifact in record.artifacts for d in artifact.chunk_sha256):
            try:
                await asyncio.to_thread(self.read_chunk, digest)
            except DataLoss:
                bad.append(digest)
        return bad

    # --- records ---------------------------------------------------------------------------------
    async def pending_artifacts(self, snapshot_id: str) -> list[snapshot_pb2.PendingArtifact]:
        return [s.message for s in await self.records.list(PENDING_ARTIFACTS, snapshot_id)]

    async def commit(self, record: snapshot_pb2.SnapshotRecord) -> snapshot_pb2.SnapshotRecord:
        if not record.id:
            raise InvalidArgument("record.id is required")
        pending = await self.pending_artifacts(record.id)
        if not pending:
            raise InvalidArgument(f"no artifacts were put for snapshot {record.id}")
        del record.artifacts[:]
        record.artifacts.extend(sorted((p.artifact for p in pending), key=lambda a: a.name))
        del record.holder_nodes[:]
        record.holder_nodes.extend(sorted({p.node for p in pending if p.node}))
        if record.parent_snapshot:
            parent = await self.get(record.parent_snapshot, missing_ok=True)
            record.root_snapshot = (parent.root_snapshot or parent.id) if parent else record.parent_snapshot
        else:
            record.root_snapshot = record.id
        if not record.HasField("create_time"):
            record.create_time.GetCurrentTime()
        tx = self.etcd.transactions
        scope = PENDING_ARTIFACTS.scope(record.id)
        await self.records.transaction(
            compare=[],
            success=[
                self.records.put_op(SNAPSHOTS, record, record.id),
                tx.delete(scope, range_end=scope[:-1] + b"0"),
            ],  # every pending artifact of it
        )
        return record

    async def get(self, snapshot_id: str, missing_ok: bool = False) -> snapshot_pb2.SnapshotRecord | None:
        stored = await self.records.get(SNAPSHOTS, snapshot_id) if snapshot_id and "/" not in snapshot_id else None
        if stored is None:
            if missing_ok:
                return None
            raise NotFound(
                f"snapshot {snapshot_id} does not exist",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"snapshot": f"snapshots/{snapshot_id}"},
            )
        return stored.message

    async def all(self) -> list[snapshot_pb2.SnapshotRecord]:
        records = [s.message for s in await self.records.list(SNAPSHOTS)]
        return sorted(records, key=lambda r: (r.create_time.ToNanoseconds(), r.id))

    async def delete(self, snapshot_id: str) -> None:
        await self.get(snapshot_id)
        await self.records.delete(SNAPSHOTS, snapshot_id)

    # --- across nodes ------------------------------------------------------------------------------------
    def missing_chunks(self, record: snapshot_pb2.SnapshotRecord) -> list[str]:
        wanted = dict.fromkeys(d for a in record.artifacts for d in a.chunk_sha256)
        return [d for d in wanted if not self.chunk_path(d).exists()]

    async def fetch_missing(self, record: snapshot_pb2.SnapshotRecord, read_chunks) -> int:
        """Makes this node hold every chunk of `record`: the missing ones come from a holder node through
        `read_chunks(node, digests)` (an async iterator of (digest, data)), each verified before it is kept.
        Returns the bytes fetched. UNAVAILABLE when no holder can be reached, DATA_LOSS when a holder sends a
        chunk that does not match its hash."""
        self._inflight[id(record)] = set(d for a in record.artifacts for d in a.chunk_sha256)
        try:
            fetched = 0
            for holder in [n for n in record.holder_nodes if n != self.node]:
                missing = self.missing_chunks(record)
                if not missing:
                    break
                try:
                    for offset in range(0, len(missing), FETCH_BATCH):
                        async for digest, data in read_chunks(holder, missing[offset : offset + FETCH_BATCH]):
                            if hashlib.sha256(data).hexdigest() != digest:
                                raise DataLoss(
                                    f"node {holder} sent a corrupt chunk {digest} of snapshot {record.id}",
                                    reason="CHUNK_CORRUPT",
                                    metadata={"node": holder, "chunk": digest},
                                )
                            await asyncio.to_thread(self._store_chunk, data, digest)
                            fetched += len(data)
                except Unavailable as exc:
                    log.warning("snapshot_holder_unreachable", snapshot=record.id, node=holder, error=exc.message)
            missing = self.missing_chunks(record)
            if missing:
                raise Unavailable(
                    f"snapshot {record.id}: {len(missing)} chunks are on no reachable node "
                    f"(holders: {', '.join(record.holder_nodes) or 'none'})",
                    reason="SNAPSHOT_HOLDERS_UNAVAILABLE",
                    metadata={"snapshot": record.id},
                )
            await self._add_holder(record.id)
            if fetched:
                log.info("snapshot_fetched", snapshot=record.id, bytes=fetched, node=self.node)
            return fetched
        finally:
            self._inflight.pop(id(record), None)

    async def _add_holder(self, snapshot_id: str) -> None:
        for _ in range(50):
            stored = await self.records.get(SNAPSHOTS, snapshot_id)
            if stored is None or self.node in stored.message.holder_nodes or not self.node:
                return
            stored.message.holder_nodes.append(self.node)
            if await self.records.transaction(
                compare=[self.records.unchanged(SNAPSHOTS, stored.revision, snapshot_id)],
                success=[self.records.put_op(SNAPSHOTS, stored.message, snapshot_id)],
            ):
                return

    # --- retention and garbage collection ------------------------------------------------------------
    async def collect_garbage(self, keep_last_per_sandbox: int) -> snapshot_api.CollectGarbageResponse:
        response = snapshot_api.CollectGarbageResponse()
        now = time.time()
        records = await self.all()
        expired = {r.id for r in records if r.HasField("expire_time") and r.expire_time.ToSeconds() <= now}
        by_sandbox: dict[str, list[snapshot_pb2.SnapshotRecord]] = {}
        for record in records:
            if record.id not in expired:  # the N kept are N that are still wanted
                by_sandbox.setdefault(record.source_sandbox, []).append(record)
        if keep_last_per_sandbox:
            for group in by_sandbox.values():
                expired.update(r.id for r in group[:-keep_last_per_sandbox])
        tenants = {r.id: r.tenant for r in records}
        for snapshot_id in sorted(expired):
            # The record goes together with a note to release its tenant's quota (see `pending_releases`):
            # retention must give the storage back even if the auth service is away right now.
            await self.records.transaction(
                compare=[],
                success=[
                    self.records.delete_op(SNAPSHOTS, snapshot_id),
                    self.records.put_op(
                        QUOTA_RELEASES,
                        snapshot_pb2.QuotaRelease(
                            tenant=tenants[snapshot_id], reservation_id=f"snapshot-{snapshot_id}"
                        ),
                        snapshot_id,
                    ),
                ],
            )
            response.expired_snapshots.append(snapshot_id)
        live = [r for r in records if r.id not in expired]
        referenced = {d for r in live for a in r.artifacts for d in a.chunk_sha256}
        for pending in await self.records.list(PENDING_ARTIFACTS):
            referenced.update(pending.message.artifact.chunk_sha256)
        for digests in self._inflight.values():
            referenced.update(digests)
        freed_chunks, freed_bytes = await asyncio.to_thread(self._sweep, referenced)
        response.freed_chunks, response.freed_bytes = freed_chunks, freed_bytes
        if response.expired_snapshots or freed_chunks:
            log.info(
                "snapshot_gc",
                expired=list(response.expired_snapshots),
                freed_chunks=freed_chunks,
                freed_bytes=freed_bytes,
            )
        return response

    async def pending_releases(self) -> dict[str, str]:
        """Snapshot id -> tenant of snapshots deleted by retention whose quota is still held."""
        return {s.parts[0]: s.message.tenant for s in await self.records.list(QUOTA_RELEASES)}

    async def released(self, snapshot_id: str) -> None:
        await self.records.delete(QUOTA_RELEASES, snapshot_id)

    def _sweep(self, referenced: set[str]) -> tuple[int, int]:
        freed_chunks = freed_bytes = 0
        stale_temporary = time.time() - 600
        for path in self.chunks.glob("*/*"):
            if path.name.startswith("."):
                if path.stat().st_mtime < stale_temporary:  # left by a crash mid-write
                    path.unlink(missing_ok=True)
                continue
            if path.name not in referenced:
                freed_bytes += path.stat().st_size
                freed_chunks += 1
                path.unlink(missing_ok=True)
        return freed_chunks, freed_bytes

    async def usage(self, tenant: str = "") -> snapshot_api.GetStorageUsageResponse:
        records = [r for r in await self.all() if not tenant or r.tenant == tenant]
        logical = sum(a.size_bytes for r in records for a in r.artifacts)

        def scan() -> tuple[int, int]:
            sizes = [p.stat().st_size for p in self.chunks.glob("*/*") if not p.name.startswith(".")]
            return sum(sizes), len(sizes)

        stored, count = await asyncio.to_thread(scan)
        return snapshot_api.GetStorageUsageResponse(stored_bytes=stored, logical_bytes=logical, chunk_count=count)
