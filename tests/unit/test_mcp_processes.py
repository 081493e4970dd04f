"""The MCP server's background-process tools (start_process, read_process_output, kill_process) called through the
server's own tool dispatch, against an in-process installation (fake VMM: the real guest agent runs as a host
process)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def tools(installation):
    from microvm_mcp import server

    caller = await tenant_caller(installation, f"mcpproc-{installation.node}")
    client = AsyncClient(await installation.address("gateway"), caller.key)
    saved, server._client = server._client, client
    sandbox = await AsyncSandbox.create(client=client)

    async def call(name: str, **arguments):
        result = await server.server.call_tool(name, {"sandbox_id": sandbox.id, **arguments})
        content = result.structured_content
        if content is not None:
            return content.get("result", content) if isinstance(content, dict) else content
        return json.loads(result.content[0].text)

    call.sandbox = sandbox
    yield call
    await sandbox.kill()
    server._client = saved
    await client.close()


async def test_a_process_is_started_its_output_tail_read_and_it_is_killed(tools):
    started = await tools(
        "start_process", command="for i in 1 2 3; do echo line$i; done; echo oops >&2; exec sleep 60", tag="loop"
    )
    pid = started["pid"]
    assert pid > 0 and started["tag"] == "loop" and started["running"]
    for _ in range(500):
        read = await tools("read_process_output", pid=pid)
        if read["output_bytes"] >= 23:
            break
        await asyncio.sleep(0.02)
    assert read["running"] and read["exit_code"] is None and read["tag"] == "loop"
    assert (read["stdout"], read["stderr"], read["output_bytes"]) == ("line1\nline2\nline3\n", "oops\n", 23)
    tail = await tools("read_process_output", pid=pid, tail_bytes=6)
    # The newest 6 bytes, from whichever stream wrote them last.
    assert len(tail["stdout"]) + len(tail["stderr"]) == 6
    assert "line1\nline2\nline3\n".endswith(tail["stdout"]) and "oops\n".endswith(tail["stderr"])
    assert (await tools("kill_process", pid=pid)) == {"pid": pid, "signal": 9, "was_running": True}
    for _ in range(500):
        ended = await tools("read_process_output", pid=pid)
        if not ended["running"]:
            break
        await asyncio.sleep(0.02)
    assert ended["signal"] == 9 and ended["stdout"] == "line1\nline2\nline3\n"
    assert (await tools("kill_process", pid=pid))["was_running"] is False


async def test_a_command_that_ends_quickly_reports_its_exit_and_unknown_pids_are_tool_errors(tools):
    pid = (await tools("start_process", command="echo done; exit 3"))["pid"]
    for _ in range(500):
        read = await tools("read_process_output", pid=pid)
        if not read["running"]:
            break
        await asyncio.sleep(0.02)
    assert (read["exit_code"], read["stdout"]) == (3, "done\n")
    with pytest.raises(ToolError, match="NOT_FOUND"):
        await tools("read_process_output", pid=999999)
    with pytest.raises(ToolError, match="NOT_FOUND"):
        await tools("kill_process", pid=999999)


async def test_run_command_says_when_its_output_was_cut(tools):
    from microvm_mcp.server import _run

    result = await _run(tools.sandbox, "head -c 2000000 /dev/zero | tr '\\0' x", None, 60)
    assert result["truncated"] is True and result["exit_code"] == 0 and len(result["stdout"]) < 100_000
