"""The snapshot store's metrics (services/snapshot/metrics.py) on a whole installation (fake VMM): stored and logical
bytes, chunks and the deduplication ratio, as two snapshots of one unchanged sandbox share their chunks."""

from __future__ import annotations

import asyncio
import uuid

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape


async def store(installation) -> dict[str, float]:
    samples = await asyncio.to_thread(scrape, await installation.metrics_address("snapshot"))
    return {
        "stored": samples[("microvm_snapshot_store_bytes", labels(kind="stored"))],
        "logical": samples[("microvm_snapshot_store_bytes", labels(kind="logical"))],
        "chunks": samples[("microvm_snapshot_store_chunks", ())],
        "ratio": samples.get(("microvm_snapshot_dedup_ratio", ()), 0.0),
    }


async def warm_pool_filled(installation) -> None:
    """The template's snapshot is in the store once the pool holds a VM restored from it: nothing else is stored
    meanwhile (an installation of an earlier module may have left its record, held by a node that is gone)."""
    address = await installation.metrics_address("compute")
    for _ in range(300):
        if (await asyncio.to_thread(scrape, address)).get(("microvm_warm_pool_vms", labels(template="default"))):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the warm pool was not filled")


async def test_two_snapshots_of_one_sandbox_share_chunks_and_the_ratio_shows_it(installation):
    await warm_pool_filled(installation)
    caller = await tenant_caller(installation, f"snapm-{uuid.uuid4().hex[:6]}")
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    sandbox = created.sandbox
    snapshots = []
    try:
        before = await store(installation)
        seen = []
        for _ in range(2):
            request = api.CreateSnapshotRequest(sandbox=sandbox.name)
            reply = await caller.stub.CreateSnapshot(request, metadata=caller.metadata, timeout=60)
            snapshots.append(reply.snapshot)
            seen.append(await store(installation))
        first, second = seen
        assert first["logical"] - before["logical"] == snapshots[0].size_bytes > 0
        assert second["logical"] - first["logical"] == snapshots[1].size_bytes > 0
        assert first["chunks"] > before["chunks"] and first["stored"] > before["stored"]
        # The second snapshot of an unchanged sandbox adds little: most of its chunks are already stored.
        assert second["stored"] - first["stored"] < snapshots[1].size_bytes / 2
        assert second["ratio"] == second["logical"] / second["stored"] and second["ratio"] > first["ratio"]
    finally:
        for snapshot in snapshots:
            await caller.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=caller.metadata)
        await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=sandbox.name), metadata=caller.metadata)
