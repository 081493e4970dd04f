"""Template builds end to end on a fake-VMM installation: the real gateway, compute, relay and agent (steps run as
the agent's processes under its simulated root), real etcd. What a guest adds (a real image, apt, a server in a
snapshot) is in tests/integration/test_user_templates.py."""

from __future__ import annotations

import io
import tarfile
import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2, template_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import template_pb2 as tmpl
from microvm.sandbox.v1 import template_service_pb2 as tapi
from services.common.errors import error_info
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)

DOCKERFILE = """\
FROM default
ENV GREETING="hello from the template"
WORKDIR /app
COPY hello.txt ./
RUN sh -c 'echo "$GREETING" > greeting.txt && wc -c < hello.txt > size.txt'
"""


def context_tar(files: dict[str, bytes | str], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


class Templates:
    def __init__(self, caller) -> None:
        self.caller = caller
        self.stub = template_service_pb2_grpc.TemplateServiceStub(caller.channel)

    async def build(
        self, name: str, dockerfile: str, files=None, links=None, **spec
    ) -> list[tapi.BuildTemplateResponse]:
        async def requests():
            yield tapi.BuildTemplateRequest(
                spec=tapi.BuildTemplateSpec(template=f"templates/{name}", dockerfile=dockerfile, **spec)
            )
            if files or links:
                yield tapi.BuildTemplateRequest(context=context_tar(files or {}, links))

        call = self.stub.BuildTemplate(requests(), metadata=self.caller.metadata, timeout=120)
        return [event async for event in call]


def final(events) -> tmpl.TemplateBuild:
    builds = [e.build for e in events if e.WhichOneof("event") == "build"]
    assert builds, events
    return builds[-1]


def step_states(build: tmpl.TemplateBuild) -> list[str]:
    return [tmpl.TemplateStepState.Name(s.state).removeprefix("TEMPLATE_STEP_STATE_") for s in build.steps]


async def run(caller, sandbox: str, script: str) -> tuple[int, str]:
    request = api.ExecRequest(sandbox=sandbox, process=api.ProcessConfig(argv=["/bin/sh", "-c", script]))
    out, code = b"", None
    async for event in caller.stub.Exec(request, metadata=caller.metadata, timeout=30):
        if event.WhichOneof("event") == "stdout":
            out += event.stdout
        elif event.WhichOneof("event") == "exited":
            code = event.exited.exit_code
    return code, out.decode()


@pytest.fixture(scope="module")
async def alice(installation):
    return Templates(await tenant_caller(installation, f"tpl-a-{uuid.uuid4().hex[:6]}"))


@pytest.fixture(scope="module")
async def bob(installation):
    return Templates(await tenant_caller(installation, f"tpl-b-{uuid.uuid4().hex[:6]}"))


@pytest.fixture(scope="module")
async def built(alice):
    events = await alice.build("greeter", DOCKERFILE, {"hello.txt": "twelve bytes"})
    return events


async def test_a_build_runs_each_step_and_publishes_the_template(built):
    build = final(built)
    assert tmpl.TemplateBuildState.Name(build.state) == "TEMPLATE_BUILD_STATE_SUCCEEDED", build.failure_message
    assert step_states(build) == ["DONE", "DONE", "DONE", "DONE"]
    assert build.name.startswith("templates/greeter/builds/b")
    assert build.tags == ["latest"]
    logs = b"".join(e.log.data for e in built if e.WhichOneof("event") == "log")
    assert b"--> COPY hello.txt /app/" in logs and b"--> RUN" in logs


async def test_a_sandbox_of_the_template_has_its_files_env_and_workdir(alice, built):
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="greeter")), metadata=alice.caller.metadata
    )
    sandbox = created.sandbox
    assert sandbox.template == "greeter"
    assert sandbox.template_build == final(built).name
    code, out = await run(
        alice.caller, sandbox.name, 'pwd; cat greeting.txt size.txt hello.txt; echo; echo "$GREETING"'
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith("/app")
    assert lines[1:] == ["hello from the template", "12", "twelve bytes", "hello from the template"]
    await alice.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=sandbox.name), metadata=alice.caller.metadata)


async def test_an_unchanged_rebuild_is_all_cache_hits_and_a_change_reruns_from_that_step(alice, built):
    events = await alice.build("greeter", DOCKERFILE, {"hello.txt": "twelve bytes"}, tags=["v2"])
    again = final(events)
    assert step_states(again) == ["CACHED"] * 4
    log = b"".join(e.log.data for e in events if e.WhichOneof("event") == "log")
    assert b"is reused" in log and b"layer " not in log  # nothing booted, nothing published
    assert again.plan_key == final(built).plan_key
    changed = DOCKERFILE.replace("> size.txt", "> size.txt && echo changed > changed.txt")
    rebuilt = final(await alice.build("greeter", changed, {"hello.txt": "twelve bytes"}, tags=["v3"]))
    assert step_states(rebuilt) == ["CACHED", "CACHED", "CACHED", "DONE"]
    template = (
        await alice.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/greeter"), metadata=alice.caller.metadata)
    ).template
    assert template.tags["latest"] == final(built).name.rsplit("/", 1)[1]
    assert template.tags["v3"] == rebuilt.name.rsplit("/", 1)[1]
    assert list(template.nodes) and template.disk_bytes > 0  # where its latest build's image is

    changed_file = final(await alice.build("greeter", DOCKERFILE, {"hello.txt": "thirteen byte"}, tags=["v4"]))
    # ENV and WORKDIR change no files: they show CACHED only when a cached layer follows them.
    assert step_states(changed_file) == ["DONE", "DONE", "DONE", "DONE"]
    assert [s.key for s in changed_file.steps[:2]] == [s.key for s in again.steps[:2]]


async def test_a_failing_run_fails_the_build_with_its_step_code_and_log_and_moves_no_tag(alice):
    dockerfile = "FROM default\nRUN echo about to fail && echo bad thing >&2 && exit 7\n"
    build = final(await alice.build("failing", dockerfile))
    assert tmpl.TemplateBuildState.Name(build.state) == "TEMPLATE_BUILD_STATE_FAILED"
    assert build.failure_reason == "BUILD_STEP_FAILED"
    assert "step 1 (RUN echo about to fail" in build.failure_message and "exit" in build.failure_message
    assert "bad thing" in build.failure_message
    assert build.steps[0].exit_code == 7
    template = (
        await alice.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/failing"), metadata=alice.caller.metadata)
    ).template
    assert dict(template.tags) == {}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="failing")), metadata=alice.caller.metadata
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "TAG_NOT_FOUND"
    log = await alice.stub.GetTemplateBuildLog(
        tapi.GetTemplateBuildLogRequest(name=build.name), metadata=alice.caller.metadata
    )
    assert b"bad thing" in log.data


@pytest.mark.parametrize(
    "dockerfile, files, links, code, reason",
    [
        (
            "FROM default\nHEALTHCHECK CMD true\n",
            None,
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_INSTRUCTION",
        ),
        (
            "FROM default\nCOPY ../secret /x\n",
            {"a": "b"},
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            "COPY_OUTSIDE_CONTEXT",
        ),
        (
            "FROM default\nCOPY a /x\n",
            {"a": "b"},
            {"evil": "/etc/passwd"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "SYMLINK_OUTSIDE_CONTEXT",
        ),
        ("FROM no-such-base\nRUN true\n", None, None, grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND"),
        ("FROM default:v9\nRUN true\n", None, None, grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND"),
    ],
)
async def test_bad_definitions_are_refused_before_anything_is_built(alice, dockerfile, files, links, code, reason):
    name = f"bad-{uuid.uuid4().hex[:6]}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.build(name, dockerfile, files, links)
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await alice.stub.GetTemplate(tapi.GetTemplateRequest(name=f"templates/{name}"), metadata=alice.caller.metadata)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unsupported_instruction_names_its_line(alice):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.build("lines", "FROM default\nRUN true\nHEALTHCHECK CMD true\n")
    assert "line 3" in caught.value.details()
    assert dict(error_info(caught.value).metadata)["line"] == "3"


async def test_another_tenant_cannot_see_use_build_on_or_delete_a_private_template(alice, bob, built):
    md = bob.caller.metadata
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bob.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/greeter"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bob.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="greeter")), metadata=md
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bob.build("mine", "FROM greeter\nRUN true\n")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bob.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/greeter"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bob.stub.GetTemplateBuild(tapi.GetTemplateBuildRequest(name=final(built).name), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await bob.caller.stub.ListTemplates(api.ListTemplatesRequest(), metadata=md)
    assert "templates/greeter" not in [t.name for t in listed.templates]
    assert "templates/default" in [t.name for t in listed.templates]
    # Bob's own template of the same name is his, and does not touch Alice's.
    own = final(await bob.build("greeter", "FROM default\nRUN echo bob > bob.txt\n"))
    assert tmpl.TemplateBuildState.Name(own.state) == "TEMPLATE_BUILD_STATE_SUCCEEDED", own.failure_message
    mine = await alice.stub.GetTemplate(
        tapi.GetTemplateRequest(name="templates/greeter"), metadata=alice.caller.metadata
    )
    assert mine.template.tags["latest"] == final(built).name.rsplit("/", 1)[1]


async def test_a_template_builds_on_another_template(alice, built):
    child = final(await alice.build("child", "FROM greeter\nRUN cat greeting.txt > copied.txt\n"))
    assert tmpl.TemplateBuildState.Name(child.state) == "TEMPLATE_BUILD_STATE_SUCCEEDED", child.failure_message
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="child:latest")), metadata=alice.caller.metadata
    )
    code, out = await run(alice.caller, created.sandbox.name, "cat copied.txt; echo $GREETING")
    assert (code, out) == (0, "hello from the template\nhello from the template\n")
    await alice.caller.stub.DeleteSandbox(
        api.DeleteSandboxRequest(name=created.sandbox.name), metadata=alice.caller.metadata
    )


async def test_deleting_a_template_in_use_needs_force(alice):
    final(await alice.build("inuse", "FROM default\nWORKDIR /w\nRUN echo x > x.txt\n"))
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="inuse")), metadata=alice.caller.metadata
    )
    md = alice.caller.metadata
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/inuse"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "TEMPLATE_IN_USE"
    await alice.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/inuse", force=True), metadata=md)
    code, out = await run(alice.caller, created.sandbox.name, "cat x.txt")  # it keeps running
    assert (code, out) == (0, "x\n")
    await alice.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/inuse"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_builds_are_listed_newest_first_and_watchable_after_they_end(alice, built):
    listed = await alice.stub.ListTemplateBuilds(
        tapi.ListTemplateBuildsRequest(parent="templates/greeter"), metadata=alice.caller.metadata
    )
    names = [b.name for b in listed.builds]
    assert final(built).name in names and len(names) >= 4
    assert [b.create_time.ToNanoseconds() for b in listed.builds] == sorted(
        (b.create_time.ToNanoseconds() for b in listed.builds), reverse=True
    )
    watched = [
        e
        async for e in alice.stub.WatchTemplateBuild(
            tapi.WatchTemplateBuildRequest(name=final(built).name), metadata=alice.caller.metadata, timeout=10
        )
    ]
    assert watched[-1].build.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED


async def test_snapshots_and_their_restores_record_the_build_and_keep_its_defaults(alice, built):
    md = alice.caller.metadata
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="greeter")), metadata=md
    )
    snapshot = (
        await alice.caller.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=created.sandbox.name), metadata=md)
    ).snapshot
    assert snapshot.template_build == final(built).name
    restored = (
        await alice.caller.stub.RestoreSnapshot(api.RestoreSnapshotRequest(snapshot=snapshot.name), metadata=md)
    ).sandbox
    assert restored.template_build == final(built).name
    code, out = await run(alice.caller, restored.name, 'pwd; echo "$GREETING"')
    assert code == 0 and out.splitlines()[0].endswith("/app") and out.splitlines()[1] == "hello from the template"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/greeter"), metadata=md)
    assert error_info(caught.value).reason == "TEMPLATE_IN_USE"
    for name in (created.sandbox.name, restored.name):
        await alice.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=md)
    await alice.caller.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=md)


async def test_a_trailing_workdir_makes_its_directory_as_a_cached_layer(alice):
    first = final(await alice.build("trail", "FROM default\nRUN echo a > a.txt\nWORKDIR /data\n"))
    assert step_states(first) == ["DONE", "DONE"], first.failure_message
    second = final(await alice.build("trail", "FROM default\nRUN echo a > a.txt\nWORKDIR /data\nENV X=1\n"))
    assert step_states(second) == ["CACHED", "CACHED", "DONE"], second.failure_message
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="trail")), metadata=alice.caller.metadata
    )
    code, out = await run(alice.caller, created.sandbox.name, 'pwd; echo "$X"')
    assert code == 0 and out.splitlines()[0].endswith("/data") and out.splitlines()[1] == "1"
    await alice.caller.stub.DeleteSandbox(
        api.DeleteSandboxRequest(name=created.sandbox.name), metadata=alice.caller.metadata
    )


async def test_a_rebuild_that_reuses_an_image_shows_where_that_image_is(alice):
    dockerfile = "FROM default\nWORKDIR /m\nRUN echo m > m.txt\n"
    first = final(await alice.build("mirror", dockerfile))
    again = final(await alice.build("mirror", dockerfile))  # `latest` moves to a build sharing the first's image
    assert step_states(again) == ["CACHED", "CACHED"] and again.name != first.name
    md = alice.caller.metadata
    template = (await alice.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/mirror"), metadata=md)).template
    assert template.tags["latest"] == again.name.rsplit("/", 1)[1]
    assert list(template.nodes) and template.disk_bytes > 0


async def test_a_template_with_its_own_size_starts_warm_at_that_size(alice, installation):
    from microvm.types.v1 import vm_pb2
    from services.common.records import VMS, Records
    from tests.inprocess import etcd_client_for

    recipe = "from: default\nworkdir: /s\nsteps:\n  - run: echo s > s.txt\nresources: {vcpus: 2, memory_mib: 512}\n"
    md = alice.caller.metadata

    async def build():
        async def requests():
            yield tapi.BuildTemplateRequest(spec=tapi.BuildTemplateSpec(template="templates/sized", recipe=recipe))

        return [e async for e in alice.stub.BuildTemplate(requests(), metadata=md, timeout=120)]

    built = final(await build())
    assert built.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, built.failure_message
    template = (await alice.stub.GetTemplate(tapi.GetTemplateRequest(name="templates/sized"), metadata=md)).template
    assert list(template.warm_sizes) == ["2c512m"]  # snapshotted at its own size when it was published
    created = (
        await alice.caller.stub.CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="sized")), metadata=md
        )
    ).sandbox
    assert (created.vcpus, created.memory_mib) == (2, 512)
    records = Records(etcd_client_for(installation.etcd_endpoint))
    vms = [s.message for s in await records.list(VMS) if s.message.id.startswith(created.name.split("/")[1])]
    assert vms and vms[0].start_method in ("template-snapshot", "warm-pool") and vms[0].state == vm_pb2.VM_STATE_RUNNING
    await alice.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.name), metadata=md)


async def test_a_templates_pool_size_changes_its_warm_pool_now(alice, installation):
    import asyncio

    from google.protobuf import field_mask_pb2

    from services.common.records import VMS, Records
    from tests.inprocess import etcd_client_for

    md = alice.caller.metadata
    build = final(await alice.build("pooled", "FROM default\nWORKDIR /p\nRUN echo p > p.txt\n"))
    image = f"u-{build.name.rsplit('/', 1)[1]}"
    records = Records(etcd_client_for(installation.etcd_endpoint))

    async def pooled() -> int:
        return sum(1 for s in await records.list(VMS) if s.message.pooled and s.message.template == image)

    async def resize(size: int) -> None:
        wanted = tmpl.Template(name="templates/pooled", pool_size=size)
        mask = field_mask_pb2.FieldMask(paths=["pool_size"])
        await alice.stub.UpdateTemplate(tapi.UpdateTemplateRequest(template=wanted, update_mask=mask), metadata=md)

    async def until(count: int) -> int:
        for _ in range(100):
            if await pooled() == count:
                break
            await asyncio.sleep(0.1)
        return await pooled()

    assert await pooled() == 0  # a user template pools nothing unless asked
    await resize(1)
    assert await until(1) == 1
    await resize(0)
    assert await until(0) == 0


async def test_a_rebuild_hands_the_warm_pool_to_the_new_build_and_releases_the_old_ones(alice, installation):
    import asyncio

    from google.protobuf import field_mask_pb2

    from services.common.records import VMS, Records
    from tests.inprocess import etcd_client_for

    md = alice.caller.metadata
    records = Records(etcd_client_for(installation.etcd_endpoint))

    def image_of(build) -> str:
        return f"u-{build.name.rsplit('/', 1)[1]}"

    async def pooled(image: str) -> int:
        return sum(1 for s in await records.list(VMS) if s.message.pooled and s.message.template == image)

    async def until(image: str, count: int) -> int:
        for _ in range(150):
            if await pooled(image) == count:
                break
            await asyncio.sleep(0.1)
        return await pooled(image)

    first = final(await alice.build("handover", "FROM default\nRUN echo one > /one\n"))
    wanted = tmpl.Template(name="templates/handover", pool_size=1)
    mask = field_mask_pb2.FieldMask(paths=["pool_size"])
    await alice.stub.UpdateTemplate(tapi.UpdateTemplateRequest(template=wanted, update_mask=mask), metadata=md)
    assert await until(image_of(first), 1) == 1
    second = final(await alice.build("handover", "FROM default\nRUN echo two > /two\n"))
    assert image_of(second) != image_of(first)
    assert await until(image_of(second), 1) == 1  # the pool follows the tag
    assert await until(image_of(first), 0) == 0  # and the superseded build's is let go


async def test_a_relative_copy_over_a_template_base_lands_in_its_working_directory(alice, built):
    child = final(await alice.build("relative", "FROM greeter\nCOPY extra.txt ./\n", {"extra.txt": "extra"}))
    assert child.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, child.failure_message
    assert child.steps[0].text == "COPY extra.txt /app/"  # greeter's WORKDIR, as Docker resolves it
    created = await alice.caller.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(template="relative")), metadata=alice.caller.metadata
    )
    code, out = await run(alice.caller, created.sandbox.name, "cat extra.txt greeting.txt")
    assert (code, out) == (0, "extrahello from the template\n")
    await alice.caller.stub.DeleteSandbox(
        api.DeleteSandboxRequest(name=created.sandbox.name), metadata=alice.caller.metadata
    )
