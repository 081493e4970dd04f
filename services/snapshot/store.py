"""SnapshotChunkStore: content-addressed chunks on local disk, and snapshot records in etcd.

Chunks live at `<store>/chunks/<sha[:2]>/<sha256>`, written to a temporary name and renamed, so a chunk file
is either complete or absent; identical chunks across snapshots are stored once. Every read re-hashes the
chunk: a corrupt or missing chunk is DATA_LOSS and its bytes are never handed out.

etcd: `/microvm/snapshots/<id>` -> SnapshotRecord (proto JSON); `/microvm/snapshot-artifacts/<id>/<name>` ->
Artifact (proto JSON) between PutArtifact and CommitSnapshot. Garbage collection keeps every chunk that any
record or pending artifact references.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import structlog
from google.protobuf import json_format

from microvm.snapshot.v1 import snapshot_pb2
from services.common.errors import DataLoss, InvalidArgument, NotFound

log = structlog.get_logger()
RECORDS = "/microvm/snapshots/"
PENDING = "/microvm/snapshot-artifacts/"
# Snapshot id -> tenant, for snapshots retention deleted whose quota reservation is not released yet.
RELEASES = "/microvm/snapshot-quota-releases/"


class SnapshotChunkStore:
    def __init__(self, root: Path, etcd, chunk_size: int) -> None:
        self.root = root
        self.chunks = root / "chunks"
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.etcd = etcd
        self.chunk_size = chunk_size
        # Chunks of puts still in flight: not referenced by any record yet, but not garbage either.
        self._inflight: dict[int, set[str]] = {}

    def chunk_path(self, digest: str) -> Path:
        return self.chunks / digest[:2] / digest

    # --- chunks ----------------------------------------------------------------------------------
    def _store_chunk(self, data: bytes) -> tuple[str, bool]:
        digest = hashlib.sha256(data).hexdigest()
        path = self.chunk_path(digest)
        if path.exists():
            return digest, False
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.{time.monotonic_ns()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
        return digest, True

    def _read_chunk(self, digest: str) -> bytes:
        try:
            data = self.chunk_path(digest).read_bytes()
        except FileNotFoundError:
            raise DataLoss(
                f"chunk {digest} is missing from the store", reason="CHUNK_MISSING", metadata={"chunk": digest}
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise DataLoss(f"chunk {digest} is corrupt", reason="CHUNK_CORRUPT", metadata={"chunk": digest})
        return data

    async def put_artifact(self, snapshot_id: str, name: str, data_iterator) -> tuple[snapshot_pb2.Artifact, int]:
        """Stores a stream of bytes as chunks; returns the artifact and how many bytes were new."""
        artifact = snapshot_pb2.Artifact(name=name)
        whole = hashlib.sha256()
        buffer = bytearray()
        new_bytes = 0
        inflight = self._inflight.setdefault(id(artifact), set())

        async def flush(final: bool) -> None:
            nonlocal new_bytes
            while len(buffer) >= self.chunk_size or (final and buffer):
                piece = bytes(buffer[: self.chunk_size])
                del buffer[: self.chunk_size]
                digest = hashlib.sha256(piece).hexdigest()
                inflight.add(digest)
                digest, fresh = await asyncio.to_thread(self._store_chunk, piece)
                artifact.chunk_sha256.append(digest)
                new_bytes += len(piece) if fresh else 0

        try:
            async for data in data_iterator:
                whole.update(data)
                artifact.size_bytes += len(data)
                buffer += data
                await flush(final=False)
            await flush(final=True)
            artifact.sha256 = whole.hexdigest()
            await self.etcd.put(f"{PENDING}{snapshot_id}/{name}".encode(), json_format.MessageToJson(artifact).encode())
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
            data = await asyncio.to_thread(self._read_chunk, digest)
            whole.update(data)
            yield data
        if whole.hexdigest() != artifact.sha256:
            raise DataLoss(
                f"artifact {name} of snapshot {record.id} does not match its hash", reason="ARTIFACT_CORRUPT"
            )

    async def verify(self, record: snapshot_pb2.SnapshotRecord) -> list[str]:
        bad = []
        for artifact in record.artifacts:
            for digest in artifact.chunk_sha256:
                try:
                    await asyncio.to_thread(self._read_chunk, digest)
                except DataLoss:
                    bad.append(digest)
        return bad

    # --- records ---------------------------------------------------------------------------------
    async def pending_artifacts(self, snapshot_id: str) -> list[snapshot_pb2.Artifact]:
        result = await self.etcd.get_prefix(f"{PENDING}{snapshot_id}/".encode())
        return [json_format.Parse(kv.value, snapshot_pb2.Artifact()) for kv in result]

    async def commit(self, record: snapshot_pb2.SnapshotRecord) -> snapshot_pb2.SnapshotRecord:
        if not record.id:
            raise InvalidArgument("record.id is required")
        artifacts = await self.pending_artifacts(record.id)
        if not artifacts:
            raise InvalidArgument(f"no artifacts were put for snapshot {record.id}")
        del record.artifacts[:]
        record.artifacts.extend(sorted(artifacts, key=lambda a: a.name))
        if record.parent_snapshot:
            parent = await self.get(record.parent_snapshot, missing_ok=True)
            record.root_snapshot = (parent.root_snapshot or parent.id) if parent else record.parent_snapshot
        else:
            record.root_snapshot = record.id
        if not record.HasField("create_time"):
            record.create_time.GetCurrentTime()
        tx = self.etcd.transactions
        await self.etcd.transaction(
            compare=[],
            success=[
                tx.put(f"{RECORDS}{record.id}".encode(), json_format.MessageToJson(record).encode()),
                tx.delete(f"{PENDING}{record.id}/".encode(), range_end=f"{PENDING}{record.id}0".encode()),
            ],
            failure=[],
        )
        return record

    async def get(self, snapshot_id: str, missing_ok: bool = False) -> snapshot_pb2.SnapshotRecord | None:
        result = await self.etcd.get(f"{RECORDS}{snapshot_id}".encode())
        if result is None:
            if missing_ok:
                return None
            raise NotFound(
                f"snapshot {snapshot_id} does not exist",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"snapshot": f"snapshots/{snapshot_id}"},
            )
        return json_format.Parse(result.value, snapshot_pb2.SnapshotRecord())

    async def all(self) -> list[snapshot_pb2.SnapshotRecord]:
        result = await self.etcd.get_prefix(RECORDS.encode())
        records = [json_format.Parse(kv.value, snapshot_pb2.SnapshotRecord()) for kv in result]
        return sorted(records, key=lambda r: (r.create_time.ToNanoseconds(), r.id))

    async def delete(self, snapshot_id: str) -> None:
        await self.get(snapshot_id)
        await self.etcd.delete(f"{RECORDS}{snapshot_id}".encode())

    # --- retention and garbage collection ------------------------------------------------------------
    async def collect_garbage(self, keep_last_per_sandbox: int) -> snapshot_pb2.CollectGarbageResponse:
        response = snapshot_pb2.CollectGarbageResponse()
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
        tx = self.etcd.transactions
        for snapshot_id in sorted(expired):
            # The record goes together with a note to release its tenant's quota (see `pending_releases`):
            # retention must give the storage back even if the auth service is away right now.
            await self.etcd.transaction(
                compare=[],
                success=[
                    tx.delete(f"{RECORDS}{snapshot_id}".encode()),
                    tx.put(f"{RELEASES}{snapshot_id}".encode(), tenants[snapshot_id].encode()),
                ],
                failure=[],
            )
            response.expired_snapshots.append(snapshot_id)
        live = [r for r in records if r.id not in expired]
        referenced = {d for r in live for a in r.artifacts for d in a.chunk_sha256}
        for kv in await self.etcd.get_prefix(PENDING.encode()):
            referenced.update(json_format.Parse(kv.value, snapshot_pb2.Artifact()).chunk_sha256)
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
        return {
            kv.key.decode()[len(RELEASES) :]: kv.value.decode() for kv in await self.etcd.get_prefix(RELEASES.encode())
        }

    async def released(self, snapshot_id: str) -> None:
        await self.etcd.delete(f"{RELEASES}{snapshot_id}".encode())

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

    async def usage(self, tenant: str = "") -> snapshot_pb2.GetStorageUsageResponse:
        records = [r for r in await self.all() if not tenant or r.tenant == tenant]
        logical = sum(a.size_bytes for r in records for a in r.artifacts)

        def scan() -> tuple[int, int]:
            sizes = [p.stat().st_size for p in self.chunks.glob("*/*") if not p.name.startswith(".")]
            return sum(sizes), len(sizes)

        stored, count = await asyncio.to_thread(scan)
        return snapshot_pb2.GetStorageUsageResponse(stored_bytes=stored, logical_bytes=logical, chunk_count=count)
