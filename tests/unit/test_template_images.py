"""What a user template's images cost and how long they live: a published image counts in its tenant's stored
bytes (over quota, the build fails and nothing stays published), and the images of superseded builds are dropped
(a tag, a sandbox or being among the newest keeps one). Its own installation: the image sweep runs every second."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import template_pb2 as tmpl
from microvm.sandbox.v1 import template_service_pb2 as tapi
from services.common.errors import error_info
from tests.inprocess import InProcessNode, fake_image_root, start_installation, tenant_caller
from tests.unit.test_template_builds import Templates, final

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def pruning(etcd_server):
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-tplimg-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 0}
    node.settings["gateway"] = {"template_image_prune_seconds": 1.0}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


def user_images(node: InProcessNode) -> set[str]:
    root = node.state_dir / "compute" / "images"
    return {p.name for p in root.iterdir() if (p / "current").exists()} if root.exists() else set()


async def test_an_image_over_the_tenants_stored_bytes_fails_its_build_and_is_not_kept(pruning):
    small = Templates(await tenant_caller(pruning, f"img-q-{uuid.uuid4().hex[:6]}", max_snapshot_bytes=4096))
    before = user_images(pruning)
    build = final(await small.build("big", "FROM default\nWORKDIR /w\nRUN head -c 200000 /dev/zero > blob\n"))
    assert tmpl.TemplateBuildState.Name(build.state) == "TEMPLATE_BUILD_STATE_FAILED"
    assert build.failure_reason == "QUOTA_EXCEEDED", build.failure_message
    assert user_images(pruning) == before
    template = await small.stub.GetTemplate(
        tapi.GetTemplateRequest(name="templates/big"), metadata=small.caller.metadata
    )
    assert dict(template.template.tags) == {}


async def test_superseded_builds_lose_their_images_but_tagged_used_and_newest_keep_them(pruning):
    import asyncio

    owner = Templates(await tenant_caller(pruning, f"img-p-{uuid.uuid4().hex[:6]}"))
    builds = []
    for n in range(6):
        tags = ["first"] if n == 0 else []
        build = final(await owner.build("app", f"FROM default\nWORKDIR /w\nRUN echo {n} > n.txt\n", tags=tags))
        assert build.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, build.failure_message
        builds.append(build)
        if n == 1:  # a sandbox of build 1 keeps its image
            created = await owner.caller.stub.CreateSandbox(
                api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="app")), metadata=owner.caller.metadata
            )
    images = {b.name.rsplit("/", 1)[1]: f"u-{b.name.rsplit('/', 1)[1]}" for b in builds}
    ids = [b.name.rsplit("/", 1)[1] for b in builds]
    for _ in range(50):
        await asyncio.sleep(0.2)
        if images[ids[2]] not in user_images(pruning):
            break
    present = user_images(pruning)
    # 0: tagged `first`; 1: a sandbox came from it; 3, 4, 5: the newest three. 2 is superseded.
    assert {i for i, build_id in enumerate(ids) if images[build_id] in present} == {0, 1, 3, 4, 5}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await owner.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="app:nope")), metadata=owner.caller.metadata
        )
    assert error_info(caught.value).reason == "TAG_NOT_FOUND"
    await owner.caller.stub.DeleteSandbox(
        api.DeleteSandboxRequest(name=created.sandbox.name), metadata=owner.caller.metadata
    )


async def test_a_force_deleted_templates_image_goes_once_its_last_sandbox_does(pruning):
    import asyncio

    owner = Templates(await tenant_caller(pruning, f"img-f-{uuid.uuid4().hex[:6]}"))
    md = owner.caller.metadata
    build = final(await owner.build("forced", "FROM default\nWORKDIR /w\nRUN echo kept > kept.txt\n"))
    image = f"u-{build.name.rsplit('/', 1)[1]}"
    created = await owner.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="forced")), metadata=md
    )
    await owner.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/forced", force=True), metadata=md)
    await asyncio.sleep(2.5)  # sweeps ran: the sandbox still needs the image
    assert image in user_images(pruning)
    await owner.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=md)
    for _ in range(50):
        await asyncio.sleep(0.2)
        if image not in user_images(pruning):
            break
    assert image not in user_images(pruning)
