"""An MCP server that gives AI agents sandboxes: create, run code with streamed output, files, snapshots.

    python -m microvm_mcp                      # stdio (Claude Desktop, Cursor, ...)
    python -m microvm_mcp --http --port 8765   # streamable HTTP at http://127.0.0.1:8765/mcp

It talks to the gateway through the Python SDK (MVM_GATEWAY, MVM_API_KEY or the admin key in the state dir).
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from microvm_sandbox import AsyncClient, AsyncSandbox, SandboxError, Stderr, Stdout
from microvm_sandbox.aio import list_sandboxes

MAX_OUTPUT = 64 << 10
server = MCPServer(
    name="microvm-sandbox",
    instructions=(
        "Disposable Linux machines with hardware isolation. Create a sandbox, then run code or commands in it; "
        "files persist until the sandbox is destroyed. Snapshot before risky steps to be able to go back."
    ),
)
_client: AsyncClient | None = None


def client() -> AsyncClient:
    global _client
    if _client is None:
        _client = AsyncClient()
    return _client


async def sandbox(sandbox_id: str) -> AsyncSandbox:
    try:
        return await AsyncSandbox.connect(sandbox_id, client=client())
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


def clip(data: bytes) -> str:
    text = data.decode(errors="replace")
    return text if len(text) <= MAX_OUTPUT else text[:MAX_OUTPUT] + f"\n... [{len(text) - MAX_OUTPUT} more characters]"


async def _run(sb: AsyncSandbox, command: list[str] | str, ctx: Context | None, timeout: int) -> dict[str, Any]:
    stdout, stderr, chunks = bytearray(), bytearray(), 0
    try:
        async for event in sb.exec_stream(command, timeout=timeout):
            if isinstance(event, (Stdout, Stderr)):
                (stdout if isinstance(event, Stdout) else stderr).extend(event.data)
                chunks += 1
                if ctx is not None:  # live output, where the client asked for progress
                    await ctx.report_progress(chunks, message=event.data.decode(errors="replace")[:4096])
            elif hasattr(event, "exit_code"):
                return {
                    "exit_code": event.exit_code,
                    "signal": event.signal,
                    "timed_out": event.timed_out,
                    "stdout": clip(bytes(stdout)),
                    "stderr": clip(bytes(stderr)),
                }
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    raise ToolError("the process stream ended without an exit status")


@server.tool(description="Create a sandbox (a fresh Linux microVM). Returns its id for the other tools.")
async def create_sandbox(
    template: Annotated[str, Field(description="image to boot; `default` is Debian with python3")] = "default",
    timeout_seconds: Annotated[int, Field(description="lifetime in seconds, 1..86400", ge=1, le=86400)] = 600,
    egress: Annotated[str, Field(description="outbound network: `none` (default), `full`, or `allow-list`")] = "none",
    allow: Annotated[
        list[str], Field(description="with allow-list: destinations as CIDR or CIDR:PORT,PORT, e.g. 203.0.113.0/24:443")
    ] = [],  # noqa: B006 (pydantic copies a default per call)
) -> dict[str, str]:
    """template: image to boot ("default": Debian with python3). timeout_seconds: lifetime, 1..86400."""
    try:
        sb = await AsyncSandbox.create(template, timeout=timeout_seconds, egress=egress, allow=allow, client=client())
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"sandbox_id": sb.id, "state": "RUNNING", "ip_address": sb.ip_address}


@server.tool(description="Run code in a sandbox and return its output. language: python or sh.")
async def execute_code(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    language: Annotated[str, Field(description="`python` or `sh`")],
    code: Annotated[str, Field(description="the program; stdout/stderr are returned")],
    ctx: Context,
    timeout_seconds: Annotated[int, Field(description="kill it after this long", ge=1)] = 120,
) -> dict:
    runners = {"python": ["python3", "-c", code], "sh": ["sh", "-c", code], "bash": ["sh", "-c", code]}
    if language.lower() not in runners:
        raise ToolError(f"unsupported language {language!r}: use python or sh")
    return await _run(await sandbox(sandbox_id), runners[language.lower()], ctx, timeout_seconds)


@server.tool(description="Run a shell command line in a sandbox and return exit code, stdout and stderr.")
async def run_command(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    command: Annotated[str, Field(description="a shell command line, run by /bin/sh -c")],
    ctx: Context,
    timeout_seconds: Annotated[int, Field(description="kill it after this long", ge=1)] = 120,
) -> dict:
    return await _run(await sandbox(sandbox_id), command, ctx, timeout_seconds)


@server.tool(description="Write a text file in a sandbox (parent directories are created).")
async def write_file(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    path: Annotated[str, Field(description="absolute path in the sandbox")],
    content: Annotated[str, Field(description="text to write (replaces the file)")],
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        await sb.write(path, content)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"path": path, "bytes": len(content.encode())}


@server.tool(description="Read a text file from a sandbox.")
async def read_file(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    path: Annotated[str, Field(description="absolute path in the sandbox")],
) -> str:
    sb = await sandbox(sandbox_id)
    try:
        return clip(await sb.read(path))
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(description="List a directory in a sandbox.")
async def list_files(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    path: Annotated[str, Field(description="absolute directory path")] = "/root",
) -> list[dict[str, Any]]:
    sb = await sandbox(sandbox_id)
    try:
        return [{"path": e.path, "directory": e.is_dir, "size": e.size} for e in await sb.ls(path)]
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(description="Snapshot a sandbox (memory, processes and disk) to come back to it later.")
async def snapshot_sandbox(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
) -> dict[str, str]:
    sb = await sandbox(sandbox_id)
    try:
        return {"snapshot_id": (await sb.snapshot()).id}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(description="Start a new sandbox from a snapshot; running processes continue where they were.")
async def restore_snapshot(
    snapshot_id: Annotated[str, Field(description="id returned by snapshot_sandbox")],
) -> dict[str, str]:
    try:
        return {"sandbox_id": (await AsyncSandbox.restore(snapshot_id, client=client())).id}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(description="Clone a sandbox into N independent copies (to try alternatives in parallel).")
async def fork_sandbox(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    count: Annotated[int, Field(description="number of clones, 1..64", ge=1, le=64)] = 1,
) -> dict[str, list[str]]:
    sb = await sandbox(sandbox_id)
    try:
        return {"sandbox_ids": [clone.id for clone in await sb.fork(count)]}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(
    description="Make a TCP port of a sandbox (a web server you started in it) reachable on the host; "
    "returns the host address and port to connect to."
)
async def expose_port(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    guest_port: Annotated[int, Field(description="port the program in the sandbox listens on", ge=1, le=65535)],
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        port = await sb.expose_port(guest_port)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {
        "url": f"http://{port.host_address}:{port.host_port}/",
        "host_address": port.host_address,
        "host_port": port.host_port,
        "guest_port": port.guest_port,
    }


@server.tool(description="Stop making a TCP port of a sandbox reachable on the host (undoes expose_port).")
async def unexpose_port(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    guest_port: Annotated[int, Field(description="the port given to expose_port", ge=1, le=65535)],
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        removed = await sb.unexpose_port(guest_port)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"closed": [f"{p.host_address}:{p.host_port}" for p in removed], "guest_port": guest_port}


@server.tool(description="Destroy a sandbox and everything in it.")
async def destroy_sandbox(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
) -> dict[str, str]:
    await (await sandbox(sandbox_id)).kill()
    return {"sandbox_id": sandbox_id, "state": "DELETED"}


@server.tool(name="list_sandboxes", description="List your sandboxes.")
async def list_sandboxes_tool() -> list[dict[str, str]]:
    return [
        {
            "sandbox_id": s.name.removeprefix("sandboxes/"),
            "template": s.template,
            "expires": s.expire_time.ToJsonString(),
        }
        for s in await list_sandboxes(client())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="mvm-mcp")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run("stdio")
