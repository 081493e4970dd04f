"""Compute's own metrics (services/compute/metrics.py) on a whole installation (fake VMM, warm pool of 1): VMs by
state and template, the pool's depth, capacity and allocation, and start times by path, as Prometheus reads them."""

from __future__ import annotations

import asyncio
import uuid

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape


async def test_vms_pool_capacity_and_start_paths_are_measured(installation):
    caller = await tenant_caller(installation, f"metrics-{uuid.uuid4().hex[:6]}")
    address = await installation.metrics_address("compute")
    before = await asyncio.to_thread(scrape, address)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    try:
        samples = await asyncio.to_thread(scrape, address)
        assert samples[("microvm_vms", labels(state="running", template="default"))] >= 1
        assert samples[("microvm_node_capacity", labels(resource="vcpus"))] > 0
        held = samples[("microvm_node_allocated", labels(resource="memory_bytes"))]
        assert held > before.get(("microvm_node_allocated", labels(resource="memory_bytes")), 0)
        assert samples[("microvm_node_disk_bytes", labels(kind="total"))] > 0
        started = {
            dict(pairs)["method"]: value
            for (name, pairs), value in samples.items()
            if name == "microvm_vm_start_seconds_count"
        }
        assert sum(started.values()) >= 1 and set(started) <= {
            "warm-pool",
            "pool-fill",
            "template-snapshot",
            "cold-boot",
            "snapshot",
        }, started
    finally:
        await caller.stub.DeleteSandbox(
            api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata, timeout=60
        )
    for _ in range(200):  # the pool refills in the background
        samples = await asyncio.to_thread(scrape, address)
        if samples.get(("microvm_warm_pool_vms", labels(template="default"))) == 1:
            break
        await asyncio.sleep(0.1)
    assert samples[("microvm_warm_pool_vms", labels(template="default"))] == 1
    assert samples[("microvm_warm_pool_refill_seconds_count", labels(template="default"))] >= 1
