"""The gateway checks a valid API key itself (services/gateway/local_credentials.py), from a copy of auth's key
records kept by an etcd watch; everything else is still auth's to decide. A whole installation (fake VMM)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape


async def auth_checks(installation) -> float:
    """How many API keys auth has checked (its own counter)."""
    samples = await asyncio.to_thread(scrape, await installation.metrics_address("auth"))
    return samples.get(("microvm_auth_verifications_total", labels(kind="api_key")), 0.0)


async def test_a_valid_key_is_checked_by_the_gateway_and_a_revoked_one_is_refused_at_once(installation):
    caller = await tenant_caller(installation, f"local-{uuid.uuid4().hex[:6]}")
    listing = api.ListSandboxesRequest()
    await caller.stub.ListSandboxes(listing, metadata=caller.metadata)  # the key may be new to the gateway's copy
    for _ in range(50):  # the watch brings it within moments
        before = await auth_checks(installation)
        await caller.stub.ListSandboxes(listing, metadata=caller.metadata)
        if await auth_checks(installation) == before:
            break
        await asyncio.sleep(0.1)
    before = await auth_checks(installation)
    for _ in range(5):
        await caller.stub.ListSandboxes(listing, metadata=caller.metadata)
    assert await auth_checks(installation) == before, "a known valid key no longer costs a call to auth"

    # A wrong secret for a known key: auth decides, and says no.
    key_id = caller.key.split("_")[1]
    wrong = (("authorization", f"Bearer mvm_{key_id}_not-the-secret"),)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await caller.stub.ListSandboxes(listing, metadata=wrong)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Revoked: refused as soon as the gateway's copy hears of it.
    auth = auth_pb2_grpc.AuthServiceStub(installation.channel(await installation.address("auth")))
    await auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id=key_id), timeout=10)
    for _ in range(50):
        try:
            await caller.stub.ListSandboxes(listing, metadata=caller.metadata)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.details()
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("a revoked key was still let in after 5 s")
