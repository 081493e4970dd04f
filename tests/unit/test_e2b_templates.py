"""The E2B SDK's Template builder (services/gateway/e2b/template_builds.py, template_recipe.py), unmodified, against
an in-process installation (fake VMM, whose builder runs the steps): a template from one of ours with a COPY of an
uploaded file, ENV, WORKDIR and RUN, built, its logs streamed, and a sandbox made from it; what we refuse by name;
another tenant's build is not found."""

from __future__ import annotations

import uuid

import pytest
from e2b import AsyncSandbox, AsyncTemplate, Template
from e2b.exceptions import BuildException

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b import template_recipe
from services.gateway.e2b.shapes import E2bError

pytestmark = pytest.mark.timeout(180)


async def test_a_template_built_with_the_sdk_makes_sandboxes(doors, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the context\n")
    template = (
        Template(file_context_path=tmp_path)
        .from_template("base")
        .set_workdir("/app")
        .copy("hello.txt", "/app/hello.txt")
        .set_envs({"GREETING": "hi"})
        .run_cmd('cat hello.txt && echo "greeting=$GREETING"')  # relative: the fake guest's / is a host directory
    )
    name = f"e2b-built-{uuid.uuid4().hex[:8]}"
    logs = []
    await AsyncTemplate.build(template, name, on_build_logs=lambda entry: logs.append(entry.message))
    assert any("hello from the context" in line for line in logs), logs
    assert any("greeting=hi" in line for line in logs), logs
    assert await AsyncTemplate.exists(name) is True
    sandbox = await AsyncSandbox.create(name, timeout=60)
    try:
        ours = await doors.alice.stub.GetSandbox(
            api.GetSandboxRequest(name=f"sandboxes/{sandbox.sandbox_id}"), metadata=doors.alice.metadata, timeout=10
        )
        assert ours.sandbox.template == name
    finally:
        await sandbox.kill()


async def test_a_failing_step_fails_the_build_with_its_reason(doors):
    template = Template().from_template("base").run_cmd("echo about to fail && exit 3")
    logs = []
    with pytest.raises(BuildException):
        await AsyncTemplate.build(template, f"e2b-fails-{uuid.uuid4().hex[:8]}", on_build_logs=logs.append)
    assert any("about to fail" in entry.message for entry in logs)


async def test_a_registry_image_is_refused_by_name(doors):
    with pytest.raises(BuildException, match="python:3.11"):
        await AsyncTemplate.build(Template().from_image("python:3.11"), f"e2b-image-{uuid.uuid4().hex[:8]}")


async def test_another_tenants_build_is_not_found(doors):
    status, requested = await doors.call("POST", "/v3/templates", json={"name": f"e2b-wall-{uuid.uuid4().hex[:8]}"})
    assert status == 202
    path = f"/templates/{requested['templateID']}/builds/{requested['buildID']}"
    assert (await doors.call("GET", path + "/status"))[0] == 200
    theirs = await doors.call("GET", path + "/status", key=doors.bob.key)
    started = await doors.call("POST", "/v2" + path, key=doors.bob.key, json={"fromTemplate": "base", "steps": []})
    assert theirs[0] == started[0] == 404


def test_steps_become_a_recipe():
    start = {
        "fromImage": "e2bdev/base",
        "steps": [
            {"type": "USER", "args": ["agent"]},
            {"type": "RUN", "args": ["apt-get update", "root"]},
            {"type": "COPY", "args": ["app/", "/srv/app", "agent", ""], "filesHash": "h"},
            {"type": "ENV", "args": ["A", "1", "B", "2"]},
        ],
        "startCmd": "python3 -m http.server 8000",
        "readyCmd": "curl -sf localhost:8000",
    }
    assert template_recipe.recipe(start, {"vcpus": 2}).splitlines() == [
        "from: default",
        "steps:",
        "- user: agent",
        "- user: root",
        "- run: apt-get update",
        "- user: agent",
        "- copy:",
        "    src:",
        "    - app/",
        "    dest: /srv/app",
        "    chown: agent",
        "- env:",
        "    A: '1'",
        "    B: '2'",
        "resources:",
        "  vcpus: 2",
        "start: python3 -m http.server 8000",
        "ready:",
        "  command: curl -sf localhost:8000",
    ]
    with pytest.raises(E2bError, match="mode"):
        template_recipe.recipe({"steps": [{"type": "COPY", "args": ["a", "/a", "", "0755"]}]}, {})
