"""Fields go by their proto name or their JSON name, over HTTP and in gRPC field masks alike (found by a new user:
`networkPolicy` was refused in an update mask, and a mask with proto names was refused over HTTP). A whole
installation (fake VMM); HTTP on its gateway's HTTP door."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest
from google.protobuf import field_mask_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
# Installations in unit tests run without networking, where NONE is the one mode allowed (and not the default 0).
POLICY = {"egress": "EGRESS_MODE_NONE"}


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"names-{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def http(installation, caller):
    base = f"http://{installation.settings['gateway']['http_listen']}"
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {caller.key}"}) as session:
        for _ in range(100):  # the HTTP door opens just after the gateway's gRPC server
            try:
                async with session.get("/openapi.json"):
                    break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.05)
        yield session


@pytest.mark.parametrize("policy_name", ["networkPolicy", "network_policy"])
async def test_http_create_takes_the_json_and_the_proto_name(http, policy_name):
    async with http.post("/v1/sandboxes", json={policy_name: POLICY, "labels": {"via": "http"}}) as reply:
        body = await reply.json()
        assert reply.status == 200, body
    assert body["sandbox"]["networkPolicy"] == POLICY


@pytest.mark.parametrize("mask", ["networkPolicy,labels", "network_policy,labels"])
async def test_http_update_mask_in_either_form(http, mask):
    async with http.post("/v1/sandboxes", json={}) as reply:
        name = (await reply.json())["sandbox"]["name"]
    change = {"networkPolicy": POLICY, "labels": {"changed": "yes"}}
    async with http.patch(f"/v1/{name}", params={"updateMask": mask}, json=change) as reply:
        body = await reply.json()
        assert reply.status == 200, body
    assert body["sandbox"]["labels"] == {"changed": "yes"}
    assert body["sandbox"]["networkPolicy"] == POLICY


@pytest.mark.parametrize("path", ["networkPolicy", "network_policy"])
async def test_grpc_update_mask_paths_in_either_form(caller, path):
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    change = sandbox_pb2.Sandbox(
        name=created.sandbox.name,
        network_policy=sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_NONE),
    )
    updated = await caller.stub.UpdateSandbox(
        api.UpdateSandboxRequest(sandbox=change, update_mask=field_mask_pb2.FieldMask(paths=[path])),
        metadata=caller.metadata,
        timeout=30,
    )
    assert updated.sandbox.network_policy.egress == sandbox_pb2.EGRESS_MODE_NONE
