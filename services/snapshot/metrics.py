"""The snapshot store's Prometheus metrics: what this node's chunk store holds on disk (bytes and chunks), what the
snapshots it holds add up to, and the ratio of the two (deduplication: identical chunks are stored once). Read before
each scrape (ServiceMetrics.before_scrape): the records from etcd, the chunk files from disk in a thread."""

from __future__ import annotations

import asyncio

from services.common.metrics import ServiceMetrics


class SnapshotMetrics:
    def __init__(self, metrics: ServiceMetrics, store) -> None:
        self.store = store
        self.bytes: dict[tuple[str], int] = {}
        self.chunks: dict[tuple, int] = {}
        self.ratio: dict[tuple, float] = {}
        metrics.gauge_callback(
            "microvm_snapshot_store_bytes",
            "This node's snapshot store: `stored` on disk, `logical` the artifacts of the snapshots it holds",
            ["kind"],
            lambda: self.bytes,
        )
        metrics.gauge_callback("microvm_snapshot_store_chunks", "Chunks in this node's store", [], lambda: self.chunks)
        metrics.gauge_callback(
            "microvm_snapshot_dedup_ratio",
            "Logical bytes of the snapshots this node holds over the bytes its store keeps (absent while empty)",
            [],
            lambda: self.ratio,
        )
        metrics.before_scrape(self.refresh)

    async def refresh(self) -> None:
        node = self.store.node
        logical = sum(
            artifact.size_bytes
            for record in await self.store.all()
            if not node or node in record.holder_nodes
            for artifact in record.artifacts
        )
        stored, count = await asyncio.to_thread(self._scan)
        self.bytes = {("stored",): stored, ("logical",): logical}
        self.chunks = {(): count}
        self.ratio = {(): logical / stored} if stored else {}

    def _scan(self) -> tuple[int, int]:
        sizes = [path.stat().st_size for path in self.store.chunks.glob("*/*") if not path.name.startswith(".")]
        return sum(sizes), len(sizes)
