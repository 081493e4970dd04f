"""The MCP server's template tools (list_templates, build_template, get_template_build) called through the
server's own tool dispatch, against a fake TemplateService on a real grpc.aio server."""

from __future__ import annotations

import json

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from microvm_sandbox import AsyncClient
from tests.fakes.template_service import Script, ScriptedStep, start_fake_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def tools():
    from microvm_mcp import server

    grpc_server, address, fake = await start_fake_gateway()
    client = AsyncClient(address, "test-key")
    saved, server._client = server._client, client

    async def call(tool: str, /, **arguments):
        result = await server.server.call_tool(tool, arguments)
        content = result.structured_content
        if content is not None:
            return content.get("result", content) if isinstance(content, dict) else content
        return json.loads(result.content[0].text)

    call.fake = fake
    yield call
    server._client = saved
    await client.close()
    await grpc_server.stop(None)


async def test_build_template_from_a_dockerfile_with_inline_files(tools):
    tools.fake.script = Script(steps=[ScriptedStep("FROM default", cached=True), ScriptedStep("COPY app.py /app/")])
    built = await tools(
        "build_template",
        name="web:v1",
        dockerfile="FROM default\nCOPY app.py /app/\n",
        files={"app.py": "print('hi')", "lib/util.py": "X = 1"},
        build_args={"V": "2"},
    )
    assert built["build"] == "web/b1" and built["state"] == "SUCCEEDED" and built["tags"] == ["v1"]
    assert [(s["step"], s["state"]) for s in built["steps"]] == [(1, "CACHED"), (2, "DONE")]
    received = tools.fake.received[-1]
    assert received.spec.template == "templates/web" and dict(received.spec.build_args) == {"V": "2"}
    assert received.file("app.py") == b"print('hi')" and received.file("lib/util.py") == b"X = 1"


async def test_a_failed_build_is_a_result_with_the_step_s_output(tools):
    tools.fake.script = Script(steps=[ScriptedStep("RUN false", [b"boom\n"], exit_code=1)])
    built = await tools("build_template", name="tools", recipe="from: default\nsteps:\n  - run: 'false'\n")
    assert built["state"] == "FAILED" and built["failure_reason"] == "BUILD_STEP_FAILED"
    assert built["log_tail"] == "boom\n" and built["steps"][0]["exit_code"] == 1
    assert tools.fake.received[-1].spec.recipe.startswith("from: default") and tools.fake.received[-1].context == b""


async def test_get_template_build_and_list_templates(tools):
    tools.fake.script = Script(steps=[ScriptedStep("RUN make", [b"made\n"])])
    await tools("build_template", name="web", dockerfile="FROM default\nRUN make\n")
    found = await tools("get_template_build", build="web")
    assert found["build"] == "web/b1" and found["state"] == "SUCCEEDED" and found["log_tail"] == "made\n"
    assert (await tools("get_template_build", build="web:latest"))["build"] == "web/b1"
    listed = await tools("list_templates")
    assert {t["name"]: (t["owner"], t["tags"]) for t in listed} == {
        "default": ("builtin", {}),
        "web": ("public", {"latest": "b1"}),
    }


async def test_mistakes_are_tool_errors(tools):
    with pytest.raises(ToolError, match="exactly one"):
        await tools("build_template", name="web", dockerfile="FROM default", recipe="from: default")
    with pytest.raises(ToolError, match="NOT_FOUND"):
        await tools("get_template_build", build="nope")
    with pytest.raises(ToolError, match="relative path"):
        await tools("build_template", name="web", dockerfile="FROM default", files={"../x": "y"})
