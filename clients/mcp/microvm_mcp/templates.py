"""The MCP server's template tools: list_templates, build_template (a Dockerfile or a recipe given as text, with
no build context or a few files inline) and get_template_build. `register(server)` adds them to the server."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from microvm.sandbox.v1 import template_pb2
from microvm_sandbox import AsyncClient, BuildProgress, SandboxError, Template
from microvm_sandbox.templates import build_ref

MAX_FILES_BYTES = 8 << 20  # inline context files, together
MAX_LOG = 16 << 10  # of a build's log returned


def _client() -> AsyncClient:
    from microvm_mcp import server  # the server module registers these tools: import it late

    return server.client()


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace")
    return text if len(text) <= MAX_LOG else f"[... {len(text) - MAX_LOG} earlier characters]\n" + text[-MAX_LOG:]


def build_view(build: template_pb2.TemplateBuild) -> dict[str, Any]:
    """A build as the tools return it."""
    view: dict[str, Any] = {
        "build": build_ref(build.name),
        "state": template_pb2.TemplateBuildState.Name(build.state).removeprefix("TEMPLATE_BUILD_STATE_"),
        "tags": list(build.tags),
        "steps": [
            {
                "step": step.index + 1,
                "text": step.text,
                "state": template_pb2.TemplateStepState.Name(step.state).removeprefix("TEMPLATE_STEP_STATE_"),
                "exit_code": step.exit_code,
                "seconds": step.duration_ms / 1000,
            }
            for step in build.steps
        ],
    }
    if build.failure_reason or build.failure_message:
        view["failure_reason"], view["failure_message"] = build.failure_reason, build.failure_message
    return view


async def list_templates() -> list[dict[str, Any]]:
    try:
        found = await _client().templates.list()
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return [
        {
            "name": t.name.removeprefix("templates/"),
            "description": t.description,
            "tags": dict(t.tags),
            "owner": "builtin" if t.builtin else t.owner or "public",
            "warm": t.warm,
        }
        for t in found
    ]


async def build_template(
    name: Annotated[str, Field(description="the template's name, NAME or NAME:TAG ([a-z0-9][a-z0-9-]*)")],
    ctx: Context,
    dockerfile: Annotated[str, Field(description="a Dockerfile: FROM, RUN, COPY, ENV, WORKDIR, USER, ARG")] = "",
    recipe: Annotated[str, Field(description="or a YAML recipe: from:, apt:, pip:, steps:, start:, ready:")] = "",
    files: Annotated[
        dict[str, str], Field(description="build context: relative path -> text content, for COPY (at most 8 MiB)")
    ] = {},  # noqa: B006 (pydantic copies a default per call)
    build_args: Annotated[dict[str, str], Field(description="ARG values")] = {},  # noqa: B006
    no_cache: Annotated[bool, Field(description="run every step even when its layer is cached")] = False,
    timeout_seconds: Annotated[int, Field(description="stop waiting after this long (it goes on)", ge=1)] = 1800,
) -> dict[str, Any]:
    if bool(dockerfile) == bool(recipe):
        raise ToolError("give exactly one of dockerfile and recipe")
    if sum(len(text.encode()) for text in files.values()) > MAX_FILES_BYTES:
        raise ToolError("files: at most 8 MiB in all; copy bigger things into a sandbox instead")
    template = Template(dockerfile=dockerfile or None, recipe=recipe or None, context=dict(files) if files else None)
    progress = BuildProgress()
    stream = None
    try:
        stream = _client().templates.build_stream(
            template, name, build_args=build_args, no_cache=no_cache, timeout=timeout_seconds
        )
        async with stream:
            async for event in stream:
                progress.add(event)
                if isinstance(event, template_pb2.TemplateBuildStep) and event.state in (
                    template_pb2.TEMPLATE_STEP_STATE_RUNNING,
                    template_pb2.TEMPLATE_STEP_STATE_CACHED,
                ):
                    total = len(progress.build.steps) if progress.build is not None else None
                    with contextlib.suppress(ValueError):  # called outside a request: nobody to report to
                        await ctx.report_progress(event.index + 1, total, message=event.text)
    except TimeoutError:
        if progress.build is None:
            raise ToolError("DEADLINE_EXCEEDED: the build did not start in time") from None
        return {**build_view(progress.build), "note": "still building: follow it with get_template_build"}
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    if progress.build is None or not progress.ended:
        raise ToolError("UNAVAILABLE: the build's events stopped before it ended; ask get_template_build")
    view = build_view(progress.build)
    if progress.build.state == template_pb2.TEMPLATE_BUILD_STATE_FAILED:
        failed = progress.failed_step()
        tail = progress.tail(failed.index) if failed is not None else b""
        try:
            view["log_tail"] = _tail(tail or await _client().templates.get_build_log(progress.build.name))
        except SandboxError as error:
            view["log_tail"] = f"(the log could not be read: {error.code}: {error.message})"
    return view


async def get_template_build(
    build: Annotated[
        str, Field(description="NAME (its newest build), NAME:TAG (the build the tag names) or NAME/BUILD")
    ],
) -> dict[str, Any]:
    try:
        found = await _client().templates.find_build(build)
        log = await _client().templates.get_build_log(found.name)
    except SandboxError as error:
        raise ToolError(f"{error.code}: {error.message}") from None
    return {**build_view(found), "log_tail": _tail(log)}


def register(server: MCPServer) -> None:
    server.tool(name="list_templates", description="List the templates sandboxes can be created from.")(list_templates)
    server.tool(
        description="Build a template from a Dockerfile or a YAML recipe (docs/templates.md), with a few files "
        "as its build context. Waits for the build (progress per step) and returns its steps and state; a failed "
        "build returns state FAILED with the failed step's last output. Then create_sandbox(template=NAME)."
    )(build_template)
    server.tool(description="A template build's state, steps and the end of its log (NAME for its newest build).")(
        get_template_build
    )
