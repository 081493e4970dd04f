"""Resolving a template reference on a create: a built-in image, a user template's build, or NOT_FOUND, with the
template records and the nodes' images read in one etcd round trip (real etcd)."""

from __future__ import annotations

import uuid

import pytest

from microvm.types.v1 import node_pb2, template_pb2
from services.common.errors import NotFound
from services.common.records import NODES, TEMPLATE_BUILDS, TEMPLATES, Records
from services.gateway.template_store import TemplateStore
from services.gateway.templates import TemplateCatalog
from tests.etcd import CountingEtcd


@pytest.fixture
def tenant(calling_tenant):
    return calling_tenant


@pytest.fixture
async def image(etcd) -> str:
    """A built-in image only one node has built."""
    name, node = f"img-{uuid.uuid4().hex[:6]}", f"node-{uuid.uuid4().hex[:6]}"
    await Records(etcd).put(NODES, node_pb2.NodeRecord(name=node, templates=[name]), node)
    return name


def store_over(etcd) -> TemplateStore:
    return TemplateStore(etcd, TemplateCatalog(etcd))


async def test_a_built_in_image_resolves_in_one_round_trip(etcd, tenant, image):
    counting = CountingEtcd(etcd)
    resolved = await store_over(counting).resolve(image)
    assert (resolved.template, resolved.tag, resolved.image, resolved.build) == (image, "latest", image, None)
    assert counting.requests == ["transaction"]


async def test_the_callers_own_template_of_a_name_is_resolved_to_its_tagged_build(etcd, tenant, image):
    build = template_pb2.TemplateBuildRecord(
        id=f"b-{uuid.uuid4().hex[:8]}",
        template=image,
        tenant=tenant,
        image="u-mine",
        state=template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED,
    )
    records = Records(etcd)
    await records.put(TEMPLATE_BUILDS, build, build.id)
    await records.put(
        TEMPLATES, template_pb2.TemplateRecord(name=image, tenant=tenant, tags={"v1": build.id}), tenant, image
    )
    resolved = await store_over(etcd).resolve(f"{image}:v1")
    assert (resolved.image, resolved.build.id) == ("u-mine", build.id)  # the own template shadows the image
    with pytest.raises(NotFound, match="has no tag 'v2'"):
        await store_over(etcd).resolve(f"{image}:v2")


async def test_a_name_nobody_has_is_not_found(etcd, tenant):
    with pytest.raises(NotFound) as raised:
        await store_over(etcd).resolve(f"nothing-{uuid.uuid4().hex[:6]}")
    assert raised.value.reason == "TEMPLATE_NOT_FOUND"
