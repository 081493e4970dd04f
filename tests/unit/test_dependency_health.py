"""Each service reports what it depends on (services/common/dependencies.py) in grpc.health and in its etcd
registration, which `mvm-supervisor status` prints."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import dependencies
from services.common.dependencies import Dependency, check_all, command_dependency, disk_dependency, summary
from services.common.records import SERVICES, Records


async def test_each_check_is_ok_failed_with_its_reason_or_failed_for_being_slow(monkeypatch, tmp_path):
    monkeypatch.setattr(dependencies, "CHECK_SECONDS", 0.2)

    async def fine():
        return None

    async def broken():
        raise ConnectionRefusedError("connection refused")

    async def slow():
        await asyncio.sleep(5)

    checks = [
        Dependency("fine", fine),
        Dependency("broken", broken),
        Dependency("slow", slow),
        command_dependency("tool", ["sh", "-c", "echo no table >&2; exit 3"]),
        disk_dependency(str(tmp_path / "not" / "made" / "yet")),
    ]
    results = await check_all(checks)
    assert results["fine"] is None and results["disk"] is None
    assert results["broken"] == "ConnectionRefusedError: connection refused"
    assert results["slow"] == "no answer within 0.2s"
    assert results["tool"] == "`sh -c echo no table >&2; exit 3` exited 3: no table"
    assert summary(results).startswith("broken=failed:ConnectionRefusedError") and " fine=ok" in summary(results)


async def test_services_publish_their_dependencies_in_health_and_their_registration(installation, etcd):
    for _ in range(100):
        stored = [
            s.message for s in await Records(etcd).list(SERVICES, "compute") if s.message.node == installation.node
        ]
        if stored and "dependencies" in stored[0].metadata:
            break
        await asyncio.sleep(0.1)
    [compute] = stored
    assert compute.metadata["dependencies"] == "disk=ok etcd=ok vmm=ok"
    async with grpc.aio.insecure_channel(compute.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("etcd", "disk", "vmm"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=f"microvm.dependency.{name}"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="microvm.dependency.nftables"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # the installation runs without networking
