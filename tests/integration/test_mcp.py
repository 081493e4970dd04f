"""The MCP server, driven by the official `mcp` SDK's own client over stdio against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

pytestmark = pytest.mark.guest
TOOLS = {
    "create_sandbox",
    "execute_code",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
    "snapshot_sandbox",
    "list_snapshots",
    "delete_snapshot",
    "restore_snapshot",
    "fork_sandbox",
    "destroy_sandbox",
    "list_sandboxes",
    "expose_port",
    "unexpose_port",
    "start_process",
    "read_process_output",
    "kill_process",
}


def result_data(result) -> object:
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if isinstance(content, dict) else content
    return json.loads(result.content[0].text)


def test_mcp_tools_run_code_files_and_snapshots(stack):
    parameters = StdioServerParameters(
        command=sys.executable,
        args=["-m", "microvm_mcp"],
        env={**os.environ, "MVM_GATEWAY": stack.gateway_address, "MVM_API_KEY": stack.admin_key},
    )

    async def scenario():
        async with Client(parameters) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert set(tools) >= TOOLS
            assert all(tool.description for tool in tools.values())
            created = result_data(await client.call_tool("create_sandbox", {"timeout_seconds": 300}))
            sandbox_id = created["sandbox_id"]
            progress = []

            async def on_progress(value, total, message):
                progress.append(message)

            ran = result_data(
                await client.call_tool(
                    "execute_code",
                    {
                        "sandbox_id": sandbox_id,
                        "language": "python",
                        "code": "import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.3)",
                    },
                    progress_callback=on_progress,
                )
            )
            assert ran["exit_code"] == 0 and ran["stdout"] == "0\n1\n2\n"
            assert "".join(m or "" for m in progress).split() == ["0", "1", "2"]  # streamed as it ran
            await client.call_tool("write_file", {"sandbox_id": sandbox_id, "path": "/root/a.txt", "content": "hi"})
            assert (
                result_data(await client.call_tool("read_file", {"sandbox_id": sandbox_id, "path": "/root/a.txt"}))
                == "hi"
            )
            listed = result_data(await client.call_tool("list_files", {"sandbox_id": sandbox_id, "path": "/root"}))
            assert "/root/a.txt" in [entry["path"] for entry in listed]
            snapshot = result_data(await client.call_tool("snapshot_sandbox", {"sandbox_id": sandbox_id}))
            restored = result_data(await client.call_tool("restore_snapshot", snapshot))
            assert (
                result_data(
                    await client.call_tool("read_file", {"sandbox_id": restored["sandbox_id"], "path": "/root/a.txt"})
                )
                == "hi"
            )
            bash = await client.call_tool(
                "execute_code", {"sandbox_id": sandbox_id, "language": "bash", "code": "echo ${BASH_VERSION:+bash}"}
            )
            assert result_data(bash)["stdout"] == "bash\n"
            no_node = await client.call_tool(
                "execute_code", {"sandbox_id": sandbox_id, "language": "javascript", "code": "console.log(1)"}
            )
            assert no_node.is_error and "`node` is not installed" in no_node.content[0].text
            # A fork leaves no snapshot behind; the one asked for is listed until deleted.
            forked = result_data(await client.call_tool("fork_sandbox", {"sandbox_id": sandbox_id}))
            assert "snapshot_id" not in forked
            listed = result_data(await client.call_tool("list_snapshots", {"sandbox_id": sandbox_id}))
            assert [s["snapshot_id"] for s in listed] == [snapshot["snapshot_id"]]
            await client.call_tool("destroy_sandbox", {"sandbox_id": forked["sandbox_ids"][0]})
            await client.call_tool("delete_snapshot", snapshot)
            assert result_data(await client.call_tool("list_snapshots", {"sandbox_id": sandbox_id})) == []
            again = await client.call_tool("delete_snapshot", snapshot)
            assert again.is_error and "NOT_FOUND" in again.content[0].text
            failed = await client.call_tool("read_file", {"sandbox_id": sandbox_id, "path": "/missing"})
            assert failed.is_error and "NOT_FOUND" in failed.content[0].text
            # This stack runs without networking: the agent is told why, not handed a dead URL.
            refused = await client.call_tool("expose_port", {"sandbox_id": sandbox_id, "guest_port": 8000})
            assert refused.is_error and "networking: false" in refused.content[0].text
            assert set(tools["create_sandbox"].input_schema["properties"]) >= {"egress", "allow"}
            mine = [
                s for s in result_data(await client.call_tool("list_sandboxes", {})) if s["sandbox_id"] == sandbox_id
            ]
            assert [s["state"] for s in mine] == ["RUNNING"]
            for target in (sandbox_id, restored["sandbox_id"]):
                await client.call_tool("destroy_sandbox", {"sandbox_id": target})
            gone = await client.call_tool("run_command", {"sandbox_id": sandbox_id, "command": "true"})
            assert gone.is_error and "NOT_FOUND" in gone.content[0].text

    asyncio.run(scenario())


def test_mcp_over_streamable_http_lists_tools_with_described_inputs(stack):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "microvm_mcp", "--http", "--port", str(port)],
        env={**os.environ, "MVM_GATEWAY": stack.gateway_address, "MVM_API_KEY": stack.admin_key},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def scenario():
            for _ in range(100):
                try:
                    async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                        return (await client.list_tools()).tools
                except Exception:
                    await asyncio.sleep(0.1)
            raise AssertionError("the MCP HTTP server did not come up")

        tools = {tool.name: tool for tool in asyncio.run(scenario())}
        assert set(tools) >= TOOLS
        schema = tools["execute_code"].input_schema
        assert all(schema["properties"][p].get("description") for p in ("sandbox_id", "language", "code"))
    finally:
        server.terminate()
        server.wait(timeout=10)
