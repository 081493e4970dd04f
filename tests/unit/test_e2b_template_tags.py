"""E2B's template tags, listing and deletion (services/gateway/e2b/template_routes.py) with the unmodified e2b SDK
against an in-process installation (fake VMM): a build with tags, tags assigned, listed and removed, a sandbox
created by `name:tag`, the REST listing and deletion, and the built-in templates' refusals."""

from __future__ import annotations

import uuid

import pytest
from e2b import AsyncSandbox, AsyncTemplate, Template
from e2b.exceptions import TemplateException

from microvm.sandbox.v1 import sandbox_service_pb2 as api

pytestmark = pytest.mark.timeout(180)


async def build_of(doors, sandbox: AsyncSandbox) -> str:
    """Our build id the sandbox was created from."""
    reply = await doors.alice.stub.GetSandbox(
        api.GetSandboxRequest(name=f"sandboxes/{sandbox.sandbox_id}"), metadata=doors.alice.metadata, timeout=10
    )
    return reply.sandbox.template_build.rsplit("/", 1)[1]


def as_uuid(build: str) -> str:
    return f"00000000-0000-0000-0000-{build.removeprefix('b')}"


@pytest.fixture(scope="module")
async def tagged(doors) -> str:
    """A template built twice through E2B's builder: `name:v1` with tag stable, then `name` with tag v2."""
    name = f"e2b-tags-{uuid.uuid4().hex[:8]}"
    await AsyncTemplate.build(Template().from_template("base").run_cmd("echo one"), f"{name}:v1", tags=["stable"])
    await AsyncTemplate.build(Template().from_template("base").run_cmd("echo two"), name, tags=["v2"])
    return name


async def test_a_build_applies_its_name_tag_and_tags_and_a_create_by_tag_uses_that_build(doors, tagged):
    tags = {t.tag: t for t in await AsyncTemplate.get_tags(tagged)}
    assert set(tags) == {"v1", "stable", "v2"}
    assert tags["v1"].build_id == tags["stable"].build_id != tags["v2"].build_id
    assert tags["v1"].created_at.year >= 2024
    for reference, tag in ((f"{tagged}:stable", "stable"), (f"{tagged}:v2", "v2"), (tagged, "v2")):
        sandbox = await AsyncSandbox.create(reference, timeout=60)
        try:  # without a latest tag, the name alone is the newest build
            assert as_uuid(await build_of(doors, sandbox)) == tags[tag].build_id, reference
        finally:
            await sandbox.kill()


async def test_assign_and_remove_tags_move_them(doors, tagged):
    before = {t.tag: t.build_id for t in await AsyncTemplate.get_tags(tagged)}
    assigned = await AsyncTemplate.assign_tags(f"{tagged}:v1", ["production", "pinned"])
    assert assigned.build_id == before["v1"] and sorted(assigned.tags) == ["pinned", "production"]
    moved = await AsyncTemplate.assign_tags(f"{tagged}:v2", "pinned")
    assert moved.build_id == before["v2"]
    after = {t.tag: t.build_id for t in await AsyncTemplate.get_tags(tagged)}
    assert after["production"] == before["v1"] and after["pinned"] == before["v2"]
    await AsyncTemplate.remove_tags(tagged, ["production", "pinned"])
    assert {t.tag for t in await AsyncTemplate.get_tags(tagged)} == {"v1", "stable", "v2"}
    with pytest.raises(TemplateException, match="no tag 'nope'"):
        await AsyncTemplate.assign_tags(f"{tagged}:nope", "x")
    with pytest.raises(Exception, match="no tag 'never'"):
        await AsyncTemplate.remove_tags(tagged, "never")


async def test_a_create_by_an_unknown_tag_is_not_found(doors, tagged):
    with pytest.raises(Exception, match="no tag 'missing'"):
        await AsyncSandbox.create(f"{tagged}:missing", timeout=60)


async def test_templates_are_listed_in_e2bs_shape(doors, tagged):
    status, listed = await doors.call("GET", "/templates")
    assert status == 200
    by_id = {t["templateID"]: t for t in listed}
    mine = by_id[tagged]
    assert mine["buildCount"] == 2 and mine["buildStatus"] == "ready" and mine["public"] is False
    assert mine["names"] == [tagged] and mine["envdVersion"]
    assert mine["buildID"] in {t.build_id for t in await AsyncTemplate.get_tags(tagged)}
    assert "base" in by_id["default"]["names"] and by_id["default"]["public"] is True
    theirs = await doors.call("GET", "/templates", key=doors.bob.key)
    assert theirs[0] == 200 and tagged not in {t["templateID"] for t in theirs[1]}


async def test_built_in_templates_cannot_be_deleted_or_tagged(doors):
    status, body = await doors.call("DELETE", "/templates/base")
    assert status == 403 and "built into the installation" in body["message"]
    with pytest.raises(TemplateException, match="built into the installation"):
        await AsyncTemplate.assign_tags("base:latest", "mine")
    with pytest.raises(Exception, match="built into the installation"):
        await AsyncTemplate.remove_tags("base", "latest")


async def test_a_template_is_deleted_and_another_tenant_cannot(doors):
    name = f"e2b-gone-{uuid.uuid4().hex[:8]}"
    await AsyncTemplate.build(Template().from_template("base").run_cmd("echo gone"), name)
    assert (await doors.call("DELETE", f"/templates/{name}", key=doors.bob.key))[0] == 404
    status, _ = await doors.call("DELETE", f"/templates/{name}")
    assert status == 204
    assert await AsyncTemplate.exists(name) is False
    status, body = await doors.call("DELETE", f"/templates/{name}")
    assert status == 404 and name in body["message"]
