"""User templates in real guests: builder VMs under QEMU with qcow2 layers, a published image booted, started,
checked ready and snapshotted, and a sandbox whose first command finds the template's server up."""

from __future__ import annotations

import io
import tarfile
import time
import uuid

import pytest

from microvm.sandbox.v1 import template_pb2 as tmpl
from microvm.sandbox.v1 import template_service_pb2 as tapi
from microvm.sandbox.v1 import template_service_pb2_grpc

pytestmark = pytest.mark.guest

RECIPE = """\
from: default
env: {GREETING: "hello from a built template"}
workdir: /srv/site
steps:
  - copy: {src: [index.html, lib/], dest: /srv/site/}   # a directory source copies its contents (Docker)
  - run: echo "built at step 2" > built.txt && ln -s index.html home.html
start: python3 -m http.server 8000 --bind 127.0.0.1
ready: {port: 8000, timeout_seconds: 60}
resources: {disk_mib: 1536}
"""
FETCH = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/index.html', timeout=5).read().decode())"


def context() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data, mode in (
            ("index.html", b"<title>template page</title>\n", 0o644),
            ("lib/run.sh", b"#!/bin/sh\necho run\n", 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build(gateway, name: str, recipe: str, data: bytes = b"", **spec) -> tuple[tmpl.TemplateBuild, bytes]:
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)

    def requests():
        yield tapi.BuildTemplateRequest(
            spec=tapi.BuildTemplateSpec(template=f"templates/{name}", recipe=recipe, **spec)
        )
        if data:
            yield tapi.BuildTemplateRequest(context=data)

    last, log = None, b""
    for event in stub.BuildTemplate(requests(), timeout=900):
        if event.WhichOneof("event") == "build":
            last = event.build
        elif event.WhichOneof("event") == "log":
            log += event.log.data
    return last, log


def states(build: tmpl.TemplateBuild) -> list[str]:
    return [tmpl.TemplateStepState.Name(s.state).removeprefix("TEMPLATE_STEP_STATE_") for s in build.steps]


@pytest.fixture(scope="module")
def site(gateway):
    name = f"site-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    built, log = build(gateway, name, RECIPE, context())
    assert built.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, (built.failure_message, log.decode(errors="replace"))
    return name, built, time.monotonic() - started


def test_the_first_command_of_a_sandbox_finds_the_template_server_up(gateway, site):
    name, built, _ = site
    sandbox = gateway.create(template=name)
    try:
        assert sandbox.template_build == built.name
        fetched = gateway.exec(sandbox.name, ["python3", "-c", FETCH])
        assert (fetched.exit_code, fetched.stdout) == (0, b"<title>template page</title>\n\n"), fetched.stderr
        script = 'pwd; cat built.txt; readlink home.html; ls -l run.sh | cut -c1-10; echo "$GREETING"'
        files = gateway.exec(sandbox.name, ["sh", "-c", script])
        lines = files.stdout.decode().splitlines()
        assert lines[:3] == ["/srv/site", "built at step 2", "index.html"], files.stderr
        assert lines[3:] == ["-rwxr-xr-x", "hello from a built template"], files.stdout
        size = gateway.exec(sandbox.name, ["sh", "-c", "df -m / | tail -1 | tr -s ' ' | cut -d' ' -f2"])
        assert int(size.stdout) > 1400, size.stdout  # the recipe's disk_mib: grown from the default's 1 GiB
    finally:
        gateway.delete(sandbox.name)


def test_a_cold_boot_of_the_template_starts_its_server_too(gateway, site):
    """Another size than the template's has no template snapshot: it boots cold, and its start command and ready
    check run before the create returns, as they ran before the snapshot."""
    name, _, _ = site
    sandbox = gateway.create(template=name, vcpus=2, memory_mib=384)
    try:
        fetched = gateway.exec(sandbox.name, ["python3", "-c", FETCH])
        assert (fetched.exit_code, fetched.stdout) == (0, b"<title>template page</title>\n\n"), fetched.stderr
    finally:
        gateway.delete(sandbox.name)


def test_an_unchanged_rebuild_does_no_work(gateway, site):
    name, built, _ = site
    again, log = build(gateway, name, RECIPE, context(), tags=["again"])
    assert again.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, again.failure_message
    assert states(again) == ["CACHED"] * len(again.steps)
    assert b"layer " not in log  # no builder VM ran


def test_a_failing_step_in_a_guest_fails_the_build_with_its_exit_code(gateway):
    failed, _ = build(gateway, f"broken-{uuid.uuid4().hex[:6]}", "from: default\nsteps:\n  - run: ls /no/such/dir\n")
    assert failed.state == tmpl.TEMPLATE_BUILD_STATE_FAILED
    assert failed.failure_reason == "BUILD_STEP_FAILED"
    assert failed.steps[0].exit_code == 2 and "No such file" in failed.failure_message


def test_a_template_from_an_alpine_like_oci_archive_runs_exec_and_files(gateway, tmp_path):
    """FROM an OCI archive built here with umoci (busybox + musl, no Python): the builder's RUN and the sandbox's
    exec and files run on the agent's own runtime."""
    from tests import musl_base

    assert not musl_base.missing_tools(), f"missing {musl_base.missing_tools()}: run `make deps`"
    archive = musl_base.oci_archive(musl_base.oci_layout(tmp_path / "layout"), tmp_path / "musl.oci.tar")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(archive, arcname="musl.oci.tar")
    dockerfile = 'FROM oci-archive:musl.oci.tar\nENV FLAVOR=musl\nRUN echo "built on $FLAVOR" > /built.txt\n'
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)

    def requests():
        spec = tapi.BuildTemplateSpec(template=f"templates/musl-{uuid.uuid4().hex[:6]}", dockerfile=dockerfile)
        yield tapi.BuildTemplateRequest(spec=spec)
        data = buffer.getvalue()
        for offset in range(0, len(data), 1 << 20):
            yield tapi.BuildTemplateRequest(context=data[offset : offset + (1 << 20)])

    built = [e.build for e in stub.BuildTemplate(requests(), timeout=900) if e.WhichOneof("event") == "build"][-1]
    assert built.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, built.failure_message
    sandbox = gateway.create(template=built.name.split("/")[1])
    try:
        result = gateway.exec(sandbox.name, ["sh", "-c", 'cat /built.txt; echo "$FLAVOR"; ls /lib/ld-musl* | wc -l'])
        assert (result.exit_code, result.stdout) == (0, b"built on musl\nmusl\n1\n"), result.stderr
        assert not gateway.exec(sandbox.name, ["sh", "-c", "command -v python3"]).stdout  # no Python in the image
        gateway.write_file(sandbox.name, "/tmp/note.txt", b"written through the files API")
        assert gateway.read_file(sandbox.name, "/tmp/note.txt") == b"written through the files API"
    finally:
        gateway.delete(sandbox.name)


def test_a_built_in_recipe_builds_on_first_use_and_a_failed_build_is_reported(gateway):
    """`python` (images/templates/python/mvm.yaml) is not built in a fresh stack: the first create starts its
    build and says so. This stack's guests have no egress, so apt cannot reach the registry: the build fails, and
    the next create reports that failure instead of building again."""
    import grpc

    from services.common.errors import error_info

    with pytest.raises(grpc.RpcError) as caught:
        gateway.create(template="python")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    info = error_info(caught.value)
    assert info.reason == "TEMPLATE_BUILDING" and info.metadata["build"].startswith("templates/python/builds/")
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)
    events = list(stub.WatchTemplateBuild(tapi.WatchTemplateBuildRequest(name=info.metadata["build"]), timeout=600))
    ended = [e.build for e in events if e.WhichOneof("event") == "build"][-1]
    assert ended.state == tmpl.TEMPLATE_BUILD_STATE_FAILED and ended.failure_reason == "BUILD_STEP_FAILED"
    with pytest.raises(grpc.RpcError) as again:
        gateway.create(template="python")
    assert error_info(again.value).reason == "TEMPLATE_BUILD_FAILED", again.value.details()
    template = stub.GetTemplate(tapi.GetTemplateRequest(name="templates/python"), timeout=30).template
    assert template.public and template.owner == "" and dict(template.tags) == {}


def test_user_and_copy_chown_set_who_owns_files_and_runs_processes(gateway):
    dockerfile = (
        "FROM default\n"
        "RUN useradd --create-home --uid 1500 agent\n"
        "COPY --chown=agent:agent notes.txt /home/agent/\n"
        "USER agent\n"
        "WORKDIR /home/agent\n"
        "RUN whoami > made-by.txt\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"notes\n"))
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)

    def requests():
        yield tapi.BuildTemplateRequest(
            spec=tapi.BuildTemplateSpec(template=f"templates/owned-{uuid.uuid4().hex[:6]}", dockerfile=dockerfile)
        )
        yield tapi.BuildTemplateRequest(context=buffer.getvalue())

    built = [e.build for e in stub.BuildTemplate(requests(), timeout=900) if e.WhichOneof("event") == "build"][-1]
    assert built.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, built.failure_message
    sandbox = gateway.create(template=built.name.split("/")[1])
    try:
        result = gateway.exec(sandbox.name, ["sh", "-c", "whoami; pwd; cat made-by.txt; stat -c %U:%G notes.txt"])
        assert result.stdout.decode().splitlines() == ["agent", "/home/agent", "agent", "agent:agent"], result.stderr
        as_root = gateway.exec(sandbox.name, ["id", "-u"], user="root")  # a command may still name its user
        assert as_root.stdout == b"0\n"
    finally:
        gateway.delete(sandbox.name)
