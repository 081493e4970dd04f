"""Template tags on our gRPC API (AssignTemplateTags, RemoveTemplateTags, a create by `name:tag`) on a fake-VMM
installation: the real gateway, compute and etcd, two real builds of one template."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import template_service_pb2 as tapi
from services.common.errors import error_info
from tests.inprocess import tenant_caller
from tests.unit.test_template_builds import Templates, final

pytestmark = pytest.mark.timeout(180)

FIRST = "FROM default\nRUN echo one > /version.txt\n"
SECOND = "FROM default\nRUN echo two > /version.txt\n"


@pytest.fixture(scope="module")
async def carol(installation):
    return Templates(await tenant_caller(installation, f"tags-c-{uuid.uuid4().hex[:6]}"))


@pytest.fixture(scope="module")
async def dave(installation):
    return Templates(await tenant_caller(installation, f"tags-d-{uuid.uuid4().hex[:6]}"))


@pytest.fixture(scope="module")
async def two_builds(carol) -> tuple[str, str]:
    """Build names of `tagged`: the first tagged v1 (and latest), the second only `next`."""
    first = final(await carol.build("tagged", FIRST, tags=["v1", "latest"]))
    second = final(await carol.build("tagged", SECOND, tags=["next"]))
    assert first.failure_message == "" and second.failure_message == ""
    return first.name, second.name


async def tags_of(templates: Templates, name: str = "tagged") -> dict[str, str]:
    reply = await templates.stub.GetTemplate(
        tapi.GetTemplateRequest(name=f"templates/{name}"), metadata=templates.caller.metadata
    )
    return dict(reply.template.tags)


async def assign(templates: Templates, build: str, *tags: str) -> tapi.AssignTemplateTagsResponse:
    return await templates.stub.AssignTemplateTags(
        tapi.AssignTemplateTagsRequest(build=build, tags=list(tags)), metadata=templates.caller.metadata
    )


async def create_build_of(templates: Templates, template: str) -> str:
    """The build a sandbox created from `template` runs (the sandbox is deleted again)."""
    caller = templates.caller
    created = await caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template=template)), metadata=caller.metadata
    )
    sandbox = created.sandbox
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=sandbox.name), metadata=caller.metadata)
    return sandbox.template_build


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def build_id(name: str) -> str:
    return name.rsplit("/", 1)[1]


async def test_assigned_tags_point_at_the_build_and_a_create_by_tag_uses_it(carol, two_builds):
    first, second = two_builds
    reply = await assign(carol, first, "stable", "prod")
    assert reply.template.tags["stable"] == reply.template.tags["prod"] == build_id(first)
    assert reply.template.tag_times["stable"].seconds > 0
    assert await create_build_of(carol, "tagged:stable") == first
    assert await create_build_of(carol, "tagged:next") == second
    assert await create_build_of(carol, "tagged") == first  # the `latest` tag, not merely the newest build


async def test_moving_a_tag_repoints_it_and_leaves_the_others(carol, two_builds):
    first, second = two_builds
    await assign(carol, first, "moving")
    await assign(carol, second, "moving")
    tags = await tags_of(carol)
    assert tags["moving"] == build_id(second) and tags["v1"] == build_id(first)
    assert await create_build_of(carol, "tagged:moving") == second


async def test_removed_tags_are_gone_and_a_create_by_them_is_not_found(carol, two_builds):
    first, _ = two_builds
    await assign(carol, first, "short-lived", "also-gone")
    md = carol.caller.metadata
    reply = await carol.stub.RemoveTemplateTags(
        tapi.RemoveTemplateTagsRequest(template="templates/tagged", tags=["short-lived", "also-gone"]), metadata=md
    )
    assert "short-lived" not in reply.template.tags and "v1" in reply.template.tags
    error = await refused(
        carol.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="tagged:short-lived")), metadata=md
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_info(error).reason == "TAG_NOT_FOUND"
    assert "no tag 'short-lived'" in error.details()
    # Removing a tag that is not there removes nothing, not even the ones that are.
    error = await refused(
        carol.stub.RemoveTemplateTags(
            tapi.RemoveTemplateTagsRequest(template="templates/tagged", tags=["v1", "never-was"]), metadata=md
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "never-was" in error.details()
    assert "v1" in await tags_of(carol)


async def test_without_a_latest_tag_the_newest_succeeded_build_is_latest(carol, two_builds):
    _, second = two_builds
    await carol.stub.RemoveTemplateTags(
        tapi.RemoveTemplateTagsRequest(template="templates/tagged", tags=["latest"]), metadata=carol.caller.metadata
    )
    assert await create_build_of(carol, "tagged") == second
    assert await create_build_of(carol, "tagged:latest") == second


async def test_bad_tags_and_builds_are_invalid_argument(carol, two_builds):
    first, _ = two_builds
    for tags, reason in ((["has space"], "INVALID_TAG"), ([], "TAGS_EMPTY"), ([f"t{i}" for i in range(17)], None)):
        error = await refused(assign(carol, first, *tags))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, tags
        assert reason is None or error_info(error).reason == reason
    error = await refused(assign(carol, "templates/tagged/builds/nonsense", "x"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(error).reason == "INVALID_BUILD_NAME"
    error = await refused(assign(carol, "templates/tagged/builds/b000000000000", "x"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_info(error).reason == "BUILD_NOT_FOUND"


async def test_a_failed_build_cannot_be_tagged(carol):
    failed = final(await carol.build("tagged-failing", "FROM default\nRUN exit 3\n"))
    error = await refused(assign(carol, failed.name, "v1"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(error).reason == "BUILD_NOT_SUCCEEDED"


async def test_a_template_holds_at_most_64_tags(carol, two_builds):
    first, _ = two_builds
    present = len(await tags_of(carol))
    for start in range(0, 64 - present, 16):
        await assign(carol, first, *[f"bulk{i}" for i in range(start, min(start + 16, 64 - present))])
    error = await refused(assign(carol, first, "one-too-many"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than 64 tags" in error.details()
    await carol.stub.RemoveTemplateTags(
        tapi.RemoveTemplateTagsRequest(template="templates/tagged", tags=[f"bulk{i}" for i in range(64 - present)]),
        metadata=carol.caller.metadata,
    )


async def test_another_tenants_template_and_its_tags_are_invisible(carol, dave, two_builds):
    first, _ = two_builds
    md = dave.caller.metadata
    error = await refused(assign(dave, first, "mine"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await refused(
        dave.stub.RemoveTemplateTags(
            tapi.RemoveTemplateTagsRequest(template="templates/tagged", tags=["v1"]), metadata=md
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await refused(
        dave.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="tagged:v1")), metadata=md
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_info(error).reason == "TEMPLATE_NOT_FOUND"
    assert "mine" not in await tags_of(carol)


async def test_a_built_in_template_cannot_be_tagged_or_deleted(carol):
    md = carol.caller.metadata
    error = await refused(
        carol.stub.RemoveTemplateTags(
            tapi.RemoveTemplateTagsRequest(template="templates/default", tags=["x"]), metadata=md
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(error).reason == "TEMPLATE_BUILTIN"
    error = await refused(carol.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/default"), metadata=md))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "built into the installation" in error.details()


async def test_the_cli_tags_a_build_by_id_or_by_tag_and_untags(installation, carol, two_builds, monkeypatch, capfd):
    from mvm_cli.main import run as mvm

    first, second = two_builds
    monkeypatch.setenv("MVM_API_KEY", carol.caller.key)
    gateway = await installation.address("gateway")

    async def cli(*argv: str) -> tuple[int, str, str]:
        capfd.readouterr()
        status = await asyncio.to_thread(mvm, ["--gateway", gateway, *argv])
        return (status, *capfd.readouterr())

    status, out, _ = await cli("template", "tag", "tagged", build_id(second), "cli-a", "cli-b")
    assert status == 0 and "cli-a, cli-b" in out and build_id(second) in out
    status, _, _ = await cli("template", "tag", "tagged", "v1", "cli-b")  # BUILD given as a tag: moves cli-b
    assert status == 0
    tags = await tags_of(carol)
    assert tags["cli-a"] == build_id(second) and tags["cli-b"] == build_id(first)
    status, out, _ = await cli("template", "untag", "tagged", "cli-a", "cli-b")
    assert status == 0 and "removed cli-a, cli-b" in out
    status, _, err = await cli("template", "untag", "tagged", "cli-a")
    assert status != 0 and "no tag 'cli-a'" in err
