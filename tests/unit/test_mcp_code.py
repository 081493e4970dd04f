"""The MCP server's code tools (run_code and the code contexts) called through the server's own tool dispatch, against
an in-process installation whose `code-interpreter` sandboxes reach a real code server with Python kernels."""

from __future__ import annotations

import base64
import json

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
async def tools(code_installation):
    from microvm_mcp import server

    caller = await tenant_caller(code_installation, f"mcpcode-{code_installation.node}")
    client = AsyncClient(await code_installation.address("gateway"), caller.key)
    saved, server._client = server._client, client
    sandbox = await AsyncSandbox.create("code-interpreter", client=client)

    async def call(name: str, **arguments):
        """The tool's whole result (content blocks) for run_code, its data for the others."""
        result = await server.server.call_tool(name, {"sandbox_id": sandbox.id, **arguments})
        if name == "run_code":
            return result
        content = result.structured_content
        if content is not None:
            return content.get("result", content) if isinstance(content, dict) else content
        return json.loads(result.content[0].text)

    yield call
    await sandbox.kill()
    server._client = saved
    await client.close()


async def test_run_code_returns_text_and_keeps_state_between_calls(tools):
    context = (await tools("create_code_context"))["context_id"]
    await tools("run_code", code="total = 40", context=context)
    result = await tools("run_code", code="print('adding')\ntotal + 2", context=context)
    [text] = result.content
    assert text.type == "text" and "stdout:\nadding\n" in text.text and "result:\n42" in text.text
    listed = await tools("list_code_contexts")
    assert context in [c["context_id"] for c in listed["contexts"]] and "python" in listed["languages"]


async def test_run_code_returns_a_plot_as_image_content_and_its_chart_as_text(tools):
    code = "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.title('votes')\nplt.show()"
    result = await tools("run_code", code=code)
    text, image = result.content
    assert image.type == "image" and image.mime_type == "image/png"
    assert base64.b64decode(image.data).startswith(PNG_SIGNATURE)
    assert "image content: png" in text.text and '"type": "bar"' in text.text and '"title": "votes"' in text.text


async def test_run_code_reports_an_exception_with_its_traceback_and_contexts_can_be_restarted_and_deleted(tools):
    failed = await tools("run_code", code="{}['missing']")
    assert not failed.is_error and "error: KeyError: 'missing'" in failed.content[0].text
    context = (await tools("create_code_context"))["context_id"]
    await tools("run_code", code="kept = 1", context=context)
    assert (await tools("restart_code_context", context=context))["state"] == "RESTARTED"
    lost = await tools("run_code", code="kept", context=context)
    assert "NameError" in lost.content[0].text
    assert (await tools("delete_code_context", context=context))["state"] == "DELETED"
    with pytest.raises(ToolError, match="NOT_FOUND"):
        await tools("run_code", code="1", context=context)
