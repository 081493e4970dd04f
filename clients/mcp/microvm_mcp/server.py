"""An MCP server that gives AI agents sandboxes: create, run code with streamed output, files, snapshots, templates.

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

from microvm.sandbox.v1 import sandbox_pb2
from microvm_mcp import code, desktop, processes, templates
from microvm_sandbox import AsyncClient, AsyncSandbox, SandboxError, languages
from microvm_sandbox.aio import list_sandboxes, list_snapshots
from microvm_sandbox.languages import Language

MAX_OUTPUT = 64 << 10
COLLECTED = 1 << 20  # output a command's call collects at most (the server drops the rest; `truncated` says so)
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


async def _run(
    sb: AsyncSandbox, command: list[str] | str, ctx: Context | None, timeout: int, lang: Language | None = None
) -> dict[str, Any]:
    """Runs `command` with its output reported as progress (where the client asked for it) as it arrives."""
    chunks = 0

    async def progress(data: bytes) -> None:
        nonlocal chunks
        chunks += 1
        if ctx is not None:
            await ctx.report_progress(chunks, message=data.decode(errors="replace")[:4096])

    try:
        result = await sb.exec(
            command, timeout=timeout, on_stdout=progress, on_stderr=progress, max_output_bytes=COLLECTED
        )
        if lang is not None:
            result = languages.checked(lang, result)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {
        "exit_code": result.exit_code,
        "signal": result.signal,
        "timed_out": result.timed_out,
        "stdout": clip(result.stdout),
        "stderr": clip(result.stderr),
        "truncated": result.truncated,
    }


@server.tool(description="Create a sandbox (a fresh Linux microVM). Returns its id for the other tools.")
async def create_sandbox(
    template: Annotated[str, Field(description="NAME[:TAG] to boot; `default` is Debian with python3")] = "default",
    timeout_seconds: Annotated[int, Field(description="lifetime in seconds, 1..86400", ge=1, le=86400)] = 600,
    egress: Annotated[str, Field(description="outbound network: `none` (default), `full`, or `allow-list`")] = "none",
    allow: Annotated[
        list[str], Field(description="with allow-list: destinations as CIDR or CIDR:PORT,PORT, e.g. 203.0.113.0/24:443")
    ] = [],  # noqa: B006 (pydantic copies a default per call)
    env: Annotated[dict[str, str], Field(description="environment variables of every command run in the sandbox")] = {},  # noqa: B006
) -> dict[str, str]:
    """template: image to boot ("default": Debian with python3). timeout_seconds: lifetime, 1..86400."""
    try:
        sb = await AsyncSandbox.create(
            template, timeout=timeout_seconds, egress=egress, allow=allow, envs=env, client=client()
        )
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"sandbox_id": sb.id, "state": "RUNNING", "ip_address": sb.ip_address}


@server.tool(
    description="Run code once in a fresh interpreter of a sandbox and return its output (no state kept between "
    "calls: run_code keeps it in a kernel). language: python, bash, sh, javascript (node), ruby, perl (the default "
    "template has python3, bash and sh)."
)
async def execute_code(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    language: Annotated[str, Field(description="`python`, `bash`, `sh`, `javascript`, `ruby` or `perl`")],
    code: Annotated[str, Field(description="the program; stdout/stderr are returned")],
    ctx: Context,
    timeout_seconds: Annotated[int, Field(description="kill it after this long", ge=1)] = 120,
) -> dict:
    try:
        lang = languages.language(language)
    except SandboxError as error:
        raise ToolError(error.message) from None
    return await _run(await sandbox(sandbox_id), languages.argv(lang, code), ctx, timeout_seconds, lang)


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


@server.tool(
    description="Snapshot a sandbox (memory, processes and disk) to come back to it later with restore_snapshot. "
    "The snapshot is kept (and counts against your storage quota) until delete_snapshot, or ttl_seconds."
)
async def snapshot_sandbox(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    ttl_seconds: Annotated[int, Field(description="delete it after this long; 0: keep until deleted", ge=0)] = 0,
) -> dict[str, str]:
    sb = await sandbox(sandbox_id)
    try:
        return {"snapshot_id": (await sb.snapshot(ttl=ttl_seconds or None)).id}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(description="Delete a snapshot (sandboxes restored from it keep running).")
async def delete_snapshot(
    snapshot_id: Annotated[str, Field(description="id returned by snapshot_sandbox or list_snapshots")],
) -> dict[str, str]:
    try:
        await client().delete_snapshot(snapshot_id)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"snapshot_id": snapshot_id, "state": "DELETED"}


@server.tool(name="list_snapshots", description="List your snapshots (oldest first), or only those of one sandbox.")
async def list_snapshots_tool(
    sandbox_id: Annotated[str, Field(description="only snapshots of this sandbox; empty: all")] = "",
) -> list[dict[str, Any]]:
    try:
        found = await list_snapshots(client(), sandbox_id)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return [
        {
            "snapshot_id": s.name.removeprefix("snapshots/"),
            "sandbox_id": s.source_sandbox.removeprefix("sandboxes/"),
            "created": s.create_time.ToJsonString(),
            "size_bytes": s.size_bytes,
        }
        for s in found
    ]


@server.tool(description="Start a new sandbox from a snapshot; running processes continue where they were.")
async def restore_snapshot(
    snapshot_id: Annotated[str, Field(description="id returned by snapshot_sandbox")],
) -> dict[str, str]:
    try:
        return {"sandbox_id": (await AsyncSandbox.restore(snapshot_id, client=client())).id}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None


@server.tool(
    description="Clone a sandbox into N independent copies (to try alternatives in parallel). The snapshot the "
    "clones are made from is deleted unless keep_snapshot."
)
async def fork_sandbox(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    count: Annotated[int, Field(description="number of clones, 1..64", ge=1, le=64)] = 1,
    keep_snapshot: Annotated[bool, Field(description="keep the snapshot, to restore it again later")] = False,
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        clones = await sb.fork(count, keep_snapshot=keep_snapshot)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    result: dict[str, Any] = {"sandbox_ids": [clone.id for clone in clones]}
    if keep_snapshot and clones:
        result["snapshot_id"] = clones[0].source_snapshot
    return result


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


@server.tool(name="list_sandboxes", description="List your sandboxes with their state and when they expire.")
async def list_sandboxes_tool() -> list[dict[str, str]]:
    try:
        found = await list_sandboxes(client())
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return [
        {
            "sandbox_id": s.name.removeprefix("sandboxes/"),
            "state": sandbox_pb2.SandboxState.Name(s.state).removeprefix("SANDBOX_STATE_"),
            "template": s.template,
            "expires": s.expire_time.ToJsonString(),
        }
        for s in found
    ]


templates.register(server)  # list_templates, build_template, get_template_build (microvm_mcp/templates.py)
processes.register(server)  # start_process, read_process_output, kill_process (microvm_mcp/processes.py)
code.register(server)  # run_code and the code contexts (microvm_mcp/code.py)
desktop.register(server)  # screenshot, click, move_mouse, type_text, press_keys, scroll (microvm_mcp/desktop.py)


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
