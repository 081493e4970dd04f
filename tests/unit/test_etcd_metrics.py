"""etcd round trips timed per service (services/common/etcd_metrics.py) on a whole installation, and readings that
need an await refreshed before each scrape (ServiceMetrics.before_scrape), a failing one leaving the scrape whole."""

from __future__ import annotations

import asyncio
import uuid

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.metrics import MetricsEndpoint, ServiceMetrics
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape


def counts(samples: dict) -> dict[str, float]:
    return {
        dict(pairs)["operation"]: value
        for (name, pairs), value in samples.items()
        if name == "microvm_etcd_request_seconds_count"
    }


async def test_each_service_times_its_own_etcd_requests_by_operation(installation):
    caller = await tenant_caller(installation, f"etcdm-{uuid.uuid4().hex[:6]}")
    gateway = await installation.metrics_address("gateway")
    before = counts(await asyncio.to_thread(scrape, gateway))
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    await caller.stub.ListSandboxes(api.ListSandboxesRequest(), metadata=caller.metadata, timeout=60)
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata)
    after = counts(await asyncio.to_thread(scrape, gateway))
    # A create reads what it decides on and places the sandbox in transactions, a list reads a range of records,
    # and a delete reads the record and writes its tombstone in a transaction.
    for operation in ("get", "range", "txn"):
        assert after.get(operation, 0) > before.get(operation, 0), (operation, before, after)
    await asyncio.sleep(1.5)  # the registration's lease is refreshed every ttl/3 (2 s here)
    network = counts(await asyncio.to_thread(scrape, await installation.metrics_address("network")))
    assert network.get("lease_keepalive", 0) >= 1 and network.get("lease_grant", 0) >= 1, network


async def test_readings_are_refreshed_before_each_scrape_and_a_failing_one_spoils_nothing():
    metrics = ServiceMetrics("test")
    kept = {"value": 0}

    async def refresh() -> None:
        await asyncio.sleep(0)
        kept["value"] += 1

    async def broken() -> None:
        raise RuntimeError("etcd away")

    metrics.before_scrape(refresh)
    metrics.before_scrape(broken)
    metrics.gauge_callback("microvm_test_refreshed", "times refreshed", ["kind"], lambda: {("n",): kept["value"]})
    endpoint = MetricsEndpoint(metrics)
    address = await endpoint.start("127.0.0.1", 0)
    try:
        first = await asyncio.to_thread(scrape, address)
        second = await asyncio.to_thread(scrape, address)
    finally:
        await endpoint.stop()
    assert first[("microvm_test_refreshed", labels(kind="n"))] == 1
    assert second[("microvm_test_refreshed", labels(kind="n"))] == 2
