"""The MCP server's stateful code tools: run_code (a Jupyter kernel in the sandbox: variables persist between calls;
text comes back as text content, PNG and JPEG results as image content) and the code contexts (create, list,
restart, delete). `register(server)` adds them to the server. The sandbox needs a template with the code server
(`code-interpreter`); execute_code (server.py) runs code once without one."""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from microvm_sandbox import AsyncSandbox, Execution, SandboxError

MAX_TEXT = 64 << 10  # characters of each stream or result returned
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
SandboxId = Annotated[str, Field(description="id returned by create_sandbox (template code-interpreter)")]
ContextId = Annotated[str, Field(description="a context id from create_code_context")]


async def _sandbox(sandbox_id: str) -> AsyncSandbox:
    from microvm_mcp import server  # the server module registers these tools: import it late

    return await server.sandbox(sandbox_id)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n... [{len(text) - MAX_TEXT} more characters]"


def execution_text(execution: Execution) -> str:
    """What an agent reads of a run: its output, each result's text (charts as data too), and the error."""
    parts = []
    if execution.logs.stdout:
        parts.append("stdout:\n" + _clip("".join(execution.logs.stdout)))
    if execution.logs.stderr:
        parts.append("stderr:\n" + _clip("".join(execution.logs.stderr)))
    for index, result in enumerate(execution.results, 1):
        label = "result" if result.is_main_result else f"display {index}"
        images = [form for form in IMAGE_TYPES if getattr(result, form) is not None]
        if images:
            label += f" (image content: {', '.join(images)})"
        lines = [f"{label}:", _clip(result.text or result.markdown or "")]
        if result.chart is not None:
            lines.append("chart data: " + _clip(json.dumps(result.chart)))
        parts.append("\n".join(line for line in lines if line))
    if execution.error is not None:
        parts.append(f"error: {execution.error}\n{_clip(execution.error.traceback)}")
    if execution.status not in ("ok", "error"):
        parts.append(f"status: {execution.status}")
    return "\n\n".join(parts) or "(no output)"


def execution_content(execution: Execution) -> list[TextContent | ImageContent]:
    """The run as MCP content: one text block, then every PNG and JPEG result as an image."""
    content: list[TextContent | ImageContent] = [TextContent(type="text", text=execution_text(execution))]
    for result in execution.results:
        for form, mime_type in IMAGE_TYPES.items():
            data = getattr(result, form)
            if data is not None:
                content.append(ImageContent(type="image", data=data, mime_type=mime_type))
    return content


def _in_a_request(ctx: Context) -> bool:
    """Whether the tool runs for a client's request (whom progress can be reported to), not called in-process."""
    try:
        return ctx.request_context is not None
    except ValueError:
        return False


async def run_code(
    sandbox_id: SandboxId,
    code: Annotated[str, Field(description="the code; the value of its last line is returned as the result")],
    ctx: Context,
    language: Annotated[str, Field(description="`python` (default) or another language the sandbox has")] = "",
    context: Annotated[str, Field(description="a context id (create_code_context); empty: the default one")] = "",
    timeout_seconds: Annotated[int, Field(description="interrupt it after this long (state kept)", ge=1)] = 300,
) -> CallToolResult:
    sb = await _sandbox(sandbox_id)
    chunks = 0

    async def progress(text: str) -> None:
        nonlocal chunks
        chunks += 1
        await ctx.report_progress(chunks, message=text[:4096])

    reporting = _in_a_request(ctx)
    try:
        execution = await sb.run_code(
            code,
            language or None,
            context=context or None,
            on_stdout=progress if reporting else None,
            on_stderr=progress if reporting else None,
            timeout=timeout_seconds,
        )
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return CallToolResult(content=execution_content(execution))


async def create_code_context(
    sandbox_id: SandboxId,
    language: Annotated[str, Field(description="`python` or another language the sandbox has")] = "python",
    cwd: Annotated[str, Field(description="its working directory; empty: the template's")] = "",
    env: Annotated[dict[str, str], Field(description="its environment variables")] = {},  # noqa: B006
) -> dict[str, Any]:
    sb = await _sandbox(sandbox_id)
    try:
        context = await sb.create_code_context(language, cwd or None, env or None)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"context_id": context.id, "language": context.language, "cwd": context.cwd}


async def list_code_contexts(sandbox_id: SandboxId) -> dict[str, Any]:
    sb = await _sandbox(sandbox_id)
    try:
        contexts, languages = await sb.list_code_contexts(), await sb.list_code_languages()
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {
        "contexts": [{"context_id": c.id, "language": c.language, "cwd": c.cwd} for c in contexts],
        "languages": languages,
    }


async def restart_code_context(sandbox_id: SandboxId, context: ContextId) -> dict[str, str]:
    sb = await _sandbox(sandbox_id)
    try:
        await sb.restart_code_context(context)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"context_id": context, "state": "RESTARTED"}


async def delete_code_context(sandbox_id: SandboxId, context: ContextId) -> dict[str, str]:
    sb = await _sandbox(sandbox_id)
    try:
        await sb.delete_code_context(context)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {"context_id": context, "state": "DELETED"}


def register(server: MCPServer) -> None:
    server.tool(
        description="Run code in a sandbox's Jupyter kernel: variables, imports and files persist between calls "
        "(per context). Returns stdout, stderr, the value of the last line and displayed results as text, plots "
        "(matplotlib) and other PNG/JPEG results as images, and the error with its traceback if it raised. Needs a "
        "sandbox created with template `code-interpreter`."
    )(run_code)
    server.tool(
        description="Create a code context: a kernel of its own (separate variables) for run_code's `context`."
    )(create_code_context)
    server.tool(description="List a sandbox's code contexts and the languages it has kernels for.")(list_code_contexts)
    server.tool(description="Restart a code context's kernel: its variables are lost.")(restart_code_context)
    server.tool(description="Delete a code context and stop its kernel.")(delete_code_context)
