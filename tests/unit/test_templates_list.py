"""ListTemplates: what a user may create from, as the nodes report it (built images, their disk sizes, which have
template snapshots for a warm create), paged, for any role that may read. A whole installation (fake VMM)."""

from __future__ import annotations

import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import auth_pb2 as auth_types
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


async def test_the_default_template_is_listed_with_its_node_and_disk(installation):
    viewer = await tenant_caller(installation, f"tmpl-{uuid.uuid4().hex[:6]}", role=auth_types.ROLE_VIEWER)
    reply = await viewer.stub.ListTemplates(api.ListTemplatesRequest(), metadata=viewer.metadata, timeout=10)
    default = {t.name: t for t in reply.templates}["templates/default"]
    assert installation.node in default.nodes
    assert default.disk_bytes == 1024 << 20  # the fake image's rootfs_size_mib
    assert not reply.next_page_token


async def test_pages_and_bad_tokens(installation):
    caller = await tenant_caller(installation, f"tmpl-{uuid.uuid4().hex[:6]}")
    first = await caller.stub.ListTemplates(api.ListTemplatesRequest(page_size=1), metadata=caller.metadata)
    assert len(first.templates) == 1
    for token in ("nonsense", "-1"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await caller.stub.ListTemplates(api.ListTemplatesRequest(page_token=token), metadata=caller.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
