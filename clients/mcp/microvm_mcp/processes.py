"""The MCP server's background-process tools: start_process, read_process_output and kill_process. A background
process belongs to the sandbox and runs on by itself; the guest keeps its newest 1 MiB of output.
`register(server)` adds them to the server."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from microvm_sandbox import AsyncSandbox, Exited, SandboxError, Stderr, Stdout

GUEST_BUFFER = 1 << 20  # the newest output the guest keeps of each background process
MAX_OUTPUT = 64 << 10  # characters of output a tool returns (server.clip)


async def sandbox(sandbox_id: str) -> AsyncSandbox:
    from microvm_mcp import server  # the server module registers these tools: import it late

    return await server.sandbox(sandbox_id)


def clip(data: bytes) -> str:
    from microvm_mcp import server

    return server.clip(data)


async def start_process(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    command: Annotated[str, Field(description="a shell command line, run by /bin/sh -c")],
    tag: Annotated[str, Field(description="a name for it, e.g. `web` (at most 256 bytes)")] = "",
    cwd: Annotated[str, Field(description="working directory; empty: /root")] = "",
    env: Annotated[dict[str, str], Field(description="environment variables added for it")] = {},  # noqa: B006
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        info = await sb.commands.start(command, envs=env, cwd=cwd, tag=tag)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"pid": info.pid, "tag": info.tag, "running": info.running}


async def read_process_output(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    pid: Annotated[int, Field(description="pid returned by start_process", ge=1)],
    tail_bytes: Annotated[
        int, Field(description="how much of its newest output to return (stdout and stderr together)", ge=0)
    ] = 16384,
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        info = await sb.commands.get(pid)
        want = min(tail_bytes, info.output_bytes, GUEST_BUFFER, MAX_OUTPUT)
        stdout, stderr, exited = await _tail(sb, pid, want, info.running)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    running = info.running and exited is None
    exit_code, signal = (exited.exit_code, exited.signal) if exited else (info.exit_code, info.signal)
    return {
        "pid": pid,
        "tag": info.tag,
        "running": running,
        "exit_code": None if running else exit_code,
        "signal": None if running else signal,
        "stdout": clip(stdout),
        "stderr": clip(stderr),
        "output_bytes": info.output_bytes,
    }


async def _tail(sb: AsyncSandbox, pid: int, want: int, running: bool) -> tuple[bytes, bytes, Exited | None]:
    """Up to `want` bytes of the process's newest output (the replay ConnectProcess starts with), without waiting
    for new output; its end when it came with them."""
    stdout, stderr, exited = bytearray(), bytearray(), None
    if want == 0 and running:
        return b"", b"", None
    handle = await sb.commands.connect(pid, tail_bytes=want, max_output_bytes=0)

    async def replay() -> None:
        nonlocal exited
        async for event in handle:
            if isinstance(event, (Stdout, Stderr)):
                (stdout if isinstance(event, Stdout) else stderr).extend(event.data)
                if running and len(stdout) + len(stderr) >= want:
                    return
            elif isinstance(event, Exited):
                exited = event
                return

    try:
        await asyncio.wait_for(replay(), 10)
    except TimeoutError:
        pass
    finally:
        await handle.disconnect()
    return bytes(stdout), bytes(stderr), exited


async def kill_process(
    sandbox_id: Annotated[str, Field(description="id returned by create_sandbox")],
    pid: Annotated[int, Field(description="pid returned by start_process", ge=1)],
    signal: Annotated[
        int, Field(description="signal number: 9 kills, 15 asks it to end, 2 is Ctrl-C", ge=1, le=64)
    ] = 9,
) -> dict[str, Any]:
    sb = await sandbox(sandbox_id)
    try:
        info = await sb.commands.signal(pid, signal)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"pid": pid, "signal": signal, "was_running": info.running}


def register(server: MCPServer) -> None:
    server.tool(
        description="Start a long-running command (a server, a build, a watcher) in the background of a sandbox and "
        "return its pid at once; it runs on by itself. Read its output with read_process_output, stop it with "
        "kill_process."
    )(start_process)
    server.tool(
        description="Read the newest output of a background process (started by start_process) and whether it still "
        "runs or how it ended. Does not wait for more output."
    )(read_process_output)
    server.tool(
        description="Stop a background process (started by start_process): SIGKILL unless `signal` says otherwise."
    )(kill_process)
