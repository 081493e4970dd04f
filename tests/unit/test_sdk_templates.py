"""The SDK's template API (`client.templates`, async and sync) against a fake TemplateService on a real grpc.aio
server (tests/fakes/template_service.py): what a build sends (the spec, the context in messages of at most 1 MiB),
the events it hands out, how a failed build and a refused one surface, and the calls around builds."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2, template_pb2, template_service_pb2
from microvm_sandbox import (
    AsyncClient,
    AsyncSandbox,
    AsyncTemplates,
    Client,
    InvalidArgumentError,
    NotFoundError,
    Sandbox,
    SandboxInfo,
    Template,
    TemplateBuildFailed,
    TemplateInUse,
    TemplateNotFound,
    Templates,
    template_context,
)
from tests.fakes.template_service import Script, ScriptedStep, start_fake_gateway

pytestmark = pytest.mark.timeout(60)
STEPS = [
    ScriptedStep("FROM default", cached=True),
    ScriptedStep("RUN make", [b"compiling\n", b"linked\n"]),
    ScriptedStep("COPY app /app"),
]


@pytest.fixture
async def gateway():
    server, address, fake = await start_fake_gateway()
    client = AsyncClient(address, "test-key")
    yield client, fake
    await client.close()
    await server.stop(None)


async def test_a_build_sends_its_spec_and_context_and_returns_the_build(gateway, tmp_path):
    client, fake = gateway
    fake.script = Script(steps=STEPS)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "big.bin").write_bytes(b"x" * (3 << 20))
    (tmp_path / ".dockerignore").write_text("*.tmp\n")
    (tmp_path / "scratch.tmp").write_text("left out")
    template = Template.from_dockerfile("FROM default\nRUN make\nCOPY app /app\n", context=tmp_path)
    logs, steps = [], []

    async def on_step(step):  # callbacks may be coroutines
        steps.append((step.index, step.state))

    build = await client.templates.build(
        template, "web:v1", tags=["stable"], build_args={"V": "2"}, no_cache=True, on_log=logs.append, on_step=on_step
    )
    assert build.name == "templates/web/builds/b1" and build.state == template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED
    received = fake.received[-1]
    assert received.spec.template == "templates/web" and list(received.spec.tags) == ["v1", "stable"]
    assert received.spec.dockerfile.startswith("FROM default") and not received.spec.recipe
    assert dict(received.spec.build_args) == {"V": "2"} and received.spec.no_cache
    assert max(received.chunk_sizes) <= 1 << 20 and sum(received.chunk_sizes) > 3 << 20
    assert sorted(received.members()) == [".dockerignore", "app", "app/big.bin"]
    assert received.file("app/big.bin") == b"x" * (3 << 20)
    assert b"".join(log.data for log in logs) == b"compiling\nlinked\n" and {log.step for log in logs} == {1}
    state = template_pb2.TemplateStepState
    assert steps == [
        (0, state.TEMPLATE_STEP_STATE_CACHED),
        (1, state.TEMPLATE_STEP_STATE_RUNNING),
        (1, state.TEMPLATE_STEP_STATE_DONE),
        (2, state.TEMPLATE_STEP_STATE_RUNNING),
        (2, state.TEMPLATE_STEP_STATE_DONE),
    ]


async def test_a_recipe_names_its_template_and_a_build_without_context_sends_none(gateway):
    client, fake = gateway
    template = Template("tools").from_template("default").apt_install(["jq"])
    await client.templates.build(template)
    received = fake.received[-1]
    assert received.spec.template == "templates/tools" and list(received.spec.tags) == []
    assert received.spec.recipe == template.to_recipe() and received.chunk_sizes == []
    with pytest.raises(InvalidArgumentError, match="name"):
        await client.templates.build(Template(dockerfile="FROM default"))


async def test_a_failed_build_raises_with_its_reason_step_and_output(gateway):
    client, fake = gateway
    fake.script = Script(
        steps=[ScriptedStep("FROM default"), ScriptedStep("RUN make test", [b"ok 1\n", b"not ok 2\n"], exit_code=2)],
        failure_message="RUN make test exited with 2",
    )
    with pytest.raises(TemplateBuildFailed) as failed:
        await client.templates.build(Template(dockerfile="FROM default\nRUN make test"), "web")
    error = failed.value
    assert error.reason == error.failure_reason == "BUILD_STEP_FAILED" and error.code == "UNKNOWN"
    assert error.failure_message == "RUN make test exited with 2"
    assert error.failed_step.index == 1 and error.failed_step.exit_code == 2
    assert error.log_tail == b"ok 1\nnot ok 2\n" and error.build.state == template_pb2.TEMPLATE_BUILD_STATE_FAILED
    assert "step 2 (RUN make test, exit code 2)" in str(error)


async def test_a_build_refused_while_the_context_is_sent_says_why(gateway, tmp_path):
    """The server refuses after the spec (`mvm-refused`, as the gateway's interceptor does) while the client still
    has 40 MiB to send: the client stops sending and gets the status with its reason, not INTERNAL."""
    client, fake = gateway
    fake.script = Script(refuse=(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DOCKERFILE", "line 1: no FROM"))
    for index in range(40):
        (tmp_path / f"f{index}").write_bytes(bytes(1 << 20))
    with pytest.raises(InvalidArgumentError) as refused:
        await client.templates.build(Template(dockerfile="RUN x\n", context=tmp_path), "web")
    assert refused.value.reason == "INVALID_DOCKERFILE" and "no FROM" in refused.value.message
    assert fake.drained < 16 << 20  # it stopped sending once refused


async def test_a_context_that_cannot_be_read_is_reported_not_cancelled(gateway, tmp_path, monkeypatch):
    """grpc only cancels a call whose request iterator fails: the SDK raises the cause instead."""
    client, _ = gateway

    def unreadable(tar, root, paths):
        raise PermissionError(13, "Permission denied", str(root / "secret"))

    monkeypatch.setattr(template_context, "_add_directory", unreadable)  # root reads every file: fail on purpose
    with pytest.raises(PermissionError, match="Permission denied"):
        await client.templates.build(Template(dockerfile="FROM default", context=tmp_path), "web")


async def test_watch_wait_and_the_calls_around_builds(gateway):
    client, fake = gateway
    fake.script = Script(steps=STEPS)
    first = await client.templates.build(Template(dockerfile="FROM default"), "web")
    second = await client.templates.build(Template(dockerfile="FROM default"), "web:v2")
    events = [event async for event in client.templates.watch("web/b2")]
    assert isinstance(events[0], template_pb2.TemplateBuild) and events[-1] == second
    assert any(isinstance(e, template_service_pb2.BuildLog) for e in events)
    assert await client.templates.wait("templates/web/builds/b1") == first
    assert [b.name for b in await client.templates.list_builds("web")] == [second.name, first.name]
    assert [b.name for b in await client.templates.list_builds("web", limit=1)] == [second.name]
    assert await client.templates.get_build("web/b1") == first
    assert await client.templates.get_build_log("web/b1") == b"compiling\nlinked\n"
    assert (await client.templates.find_build("web")).name == second.name  # the newest
    assert (await client.templates.find_build("web:v2")).name == second.name  # the build the tag names
    assert (await client.templates.find_build("web/b1")).name == first.name
    with pytest.raises(NotFoundError, match="no tag"):
        await client.templates.find_build("web:nope")
    got = await client.templates.get("templates/web")
    assert dict(got.tags) == {"latest": "b1", "v2": "b2"}  # `web:v2` moves v2 alone


async def test_build_listing_reads_every_page(gateway):
    client, fake = gateway
    fake.templates["templates/many"] = template_pb2.Template(name="templates/many")
    fake.builds["templates/many"] = [
        template_pb2.TemplateBuild(name=f"templates/many/builds/b{i}") for i in range(2500)
    ]
    assert len(await client.templates.list_builds("many")) == 2500
    assert len(await client.templates.list_builds("many", limit=1200)) == 1200


async def test_templates_are_listed_got_created_updated_and_deleted_with_typed_errors(gateway):
    client, fake = gateway
    assert [t.name for t in await client.templates.list()] == ["templates/default"]
    made = await client.templates.create("web", description="a web app", pool_size=2)
    assert made.description == "a web app" and made.pool_size == 2
    updated = await client.templates.update("web", pool_size=0)
    assert updated.HasField("pool_size") and updated.pool_size == 0 and updated.description == "a web app"
    with pytest.raises(TemplateNotFound) as missing:
        await client.templates.get("nope")
    assert missing.value.template == "nope" and missing.value.reason == "TEMPLATE_NOT_FOUND"
    fake.in_use.add("templates/web")
    with pytest.raises(TemplateInUse):
        await client.templates.delete("web")
    await client.templates.delete("web", force=True)
    assert fake.deleted == [("templates/web", True)]
    with pytest.raises(InvalidArgumentError):
        await client.templates.get("a/b")


async def test_the_sync_api_mirrors_the_async_one(gateway):
    client, fake = gateway
    for name, member in inspect.getmembers(AsyncTemplates, inspect.isfunction):
        if not name.startswith("_"):
            mirror = getattr(Templates, name)
            assert list(inspect.signature(member).parameters) == list(inspect.signature(mirror).parameters), name
            assert mirror.__doc__, name
    fake.script = Script(steps=STEPS)

    def use() -> tuple:
        with Client(client.address, "test-key") as sync:
            build = sync.templates.build(Template(dockerfile="FROM default"), "web")
            with sync.templates.watch("web/b1") as stream:
                events = list(stream)
            return build, events, stream.build, sync.templates.get_build_log("web/b1")

    build, events, last, log = await asyncio.to_thread(use)
    assert build.name == "templates/web/builds/b1" and events[-1] == build == last and log == b"compiling\nlinked\n"


def test_a_sandbox_says_which_template_build_it_started_from():
    message = sandbox_pb2.Sandbox(name="sandboxes/sbx-1", template="web:v1", template_build="templates/web/builds/b1")
    inner = AsyncSandbox(None, message)  # type: ignore[arg-type]
    assert inner.template_build == Sandbox(inner).template_build == "templates/web/builds/b1"
    assert SandboxInfo.from_message(message).template_build == "templates/web/builds/b1"
