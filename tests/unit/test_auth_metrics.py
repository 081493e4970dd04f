"""The auth service's metrics (services/auth/metrics.py) on a whole installation (fake VMM): credential checks and
refusals by reason, and each tenant's quota used against its limits as sandboxes and snapshots come and go."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30


async def samples(installation) -> dict:
    return await asyncio.to_thread(scrape, await installation.metrics_address("auth"))


def grown(before: dict, after: dict, name: str, **pairs) -> float:
    return after.get((name, labels(**pairs)), 0) - before.get((name, labels(**pairs)), 0)


async def test_checks_and_refusals_are_counted_by_kind_and_reason(installation):
    caller = await tenant_caller(installation, f"authm-{uuid.uuid4().hex[:6]}")
    auth = auth_pb2_grpc.AuthServiceStub(installation.channel(await installation.address("auth")))
    before = await samples(installation)
    await caller.stub.ListSandboxes(api.ListSandboxesRequest(), metadata=caller.metadata, timeout=10)
    token = (await auth.ExchangeApiKey(auth_pb2.ExchangeApiKeyRequest(api_key=caller.key), timeout=10)).token
    await caller.stub.ListSandboxes(api.ListSandboxesRequest(), metadata=(("authorization", f"Bearer {token}"),))
    for credential in ("mvm_not-a-key", "not.a.token"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await caller.stub.ListSandboxes(
                api.ListSandboxesRequest(), metadata=(("authorization", f"Bearer {credential}"),)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    principal = (await auth.Authenticate(auth_pb2.AuthenticateRequest(credential=caller.key), timeout=10)).principal
    issue = auth_pb2.IssueScopedTokenRequest(principal=principal, scope="desktop-view", resource="r", ttl_seconds=1)
    scoped = (await auth.IssueScopedToken(issue, timeout=10)).token
    await asyncio.sleep(1.2)
    with pytest.raises(grpc.aio.AioRpcError):
        check = auth_pb2.CheckScopedTokenRequest(token=scoped, scopes=["desktop-view"], resource="r")
        await auth.CheckScopedToken(check, timeout=10)
    after = await samples(installation)
    # API keys: the exchange, the refused key and the Authenticate above; and the first call, unless the gateway's
    # own copy of the key records already had the new key (it checks a valid key itself: local_credentials.py).
    assert grown(before, after, "microvm_auth_verifications_total", kind="api_key") in (3, 4)
    assert grown(before, after, "microvm_auth_verifications_total", kind="token") == 2
    assert grown(before, after, "microvm_auth_verifications_total", kind="scoped_token") == 1
    assert grown(before, after, "microvm_auth_denials_total", kind="api_key", reason="BAD_CREDENTIAL") == 1
    assert grown(before, after, "microvm_auth_denials_total", kind="token", reason="BAD_CREDENTIAL") == 1
    assert grown(before, after, "microvm_auth_denials_total", kind="scoped_token", reason="CREDENTIAL_EXPIRED") == 1


async def test_quota_used_and_limits_per_tenant_follow_sandboxes_and_snapshots(installation):
    tenant = f"quotam-{uuid.uuid4().hex[:6]}"
    caller = await tenant_caller(installation, tenant, max_sandboxes=3, max_vcpus=4, max_memory_mib=2048)

    async def quota() -> dict[str, tuple[float, float | None]]:
        found = await samples(installation)
        return {
            resource: (
                found[("microvm_quota_used", labels(tenant=tenant, resource=resource))],
                found.get(("microvm_quota_limit", labels(tenant=tenant, resource=resource))),
            )
            for resource in ("sandboxes", "vcpus", "memory_bytes", "disk_bytes", "snapshot_bytes")
        }

    assert await quota() == {
        "sandboxes": (0, 3),
        "vcpus": (0, 4),
        "memory_bytes": (0, 2048 << 20),
        "disk_bytes": (0, None),  # no disk limit
        "snapshot_bytes": (0, 50 * GIB),
    }
    created = await caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox={"vcpus": 2, "memory_mib": 512}), metadata=caller.metadata, timeout=60
    )
    held = await quota()
    assert (held["sandboxes"][0], held["vcpus"][0], held["memory_bytes"][0]) == (1, 2, 512 << 20)
    assert held["disk_bytes"][0] == GIB  # the template's root file system (tests/inprocess.py)
    request = api.CreateSnapshotRequest(sandbox=created.sandbox.name)
    snapshot = (await caller.stub.CreateSnapshot(request, metadata=caller.metadata, timeout=60)).snapshot
    held = await quota()
    assert held["snapshot_bytes"][0] > 0 and held["disk_bytes"][0] == GIB + held["snapshot_bytes"][0]
    await caller.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=caller.metadata)
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata)
    assert {resource: used for resource, (used, _) in (await quota()).items()} == dict.fromkeys(held, 0)
