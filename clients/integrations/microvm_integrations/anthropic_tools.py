"""The sandbox tools in Anthropic's tool-use shapes, and one dispatcher for the model's `tool_use` blocks.

    tools = anthropic_tools()                     # messages.create(..., tools=tools)
    dispatcher = AnthropicToolDispatcher(sandbox)
    messages.append({"role": "assistant", "content": response.content})
    messages.append(dispatcher.dispatch_all(response))  # {"role": "user", "content": [tool_result, ...]}

Blocks may be dicts or the `anthropic` package's objects. A result is text, plus an image block for each PNG or
JPEG the code produced (a plot the model can look at), with `is_error` when the call failed.
"""

from __future__ import annotations

from typing import Any

from microvm_integrations.execution import field_of, run_sync
from microvm_integrations.tools import SandboxTools, tool_specs


def anthropic_tools(names: list[str] | None = None) -> list[dict[str, Any]]:
    """The tools (all, or those `names`) as `tools=` for the Messages API."""
    return [{"name": s.name, "description": s.description, "input_schema": s.parameters} for s in tool_specs(names)]


class AnthropicToolDispatcher:
    """Executes Anthropic `tool_use` blocks on one sandbox (sync `Sandbox`: `dispatch`; `AsyncSandbox`:
    `adispatch`)."""

    def __init__(self, sandbox: Any, *, timeout: float | None = 300.0) -> None:
        self.tools = SandboxTools(sandbox, timeout=timeout)

    def dispatch(self, tool_use: Any) -> dict[str, Any]:
        """The `tool_result` block answering one `tool_use` block ({"type", "id", "name", "input"})."""
        return run_sync(self.adispatch(tool_use))

    async def adispatch(self, tool_use: Any) -> dict[str, Any]:
        outcome = await self.tools.acall(str(field_of(tool_use, "name")), field_of(tool_use, "input"))
        content: list[dict[str, Any]] = [{"type": "text", "text": outcome.text or "(no output)"}]
        content += [
            {"type": "image", "source": {"type": "base64", "media_type": image.media_type, "data": image.data}}
            for image in outcome.images
        ]
        tool_use_id = field_of(tool_use, "id")
        return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": outcome.is_error}

    def dispatch_all(self, message: Any) -> dict[str, Any]:
        """The user message answering every `tool_use` block of an assistant message (or of its content list)."""
        return run_sync(self.adispatch_all(message))

    async def adispatch_all(self, message: Any) -> dict[str, Any]:
        blocks = message if isinstance(message, list) else field_of(message, "content") or []
        results = [await self.adispatch(block) for block in blocks if field_of(block, "type") == "tool_use"]
        return {"role": "user", "content": results}

    def close(self) -> None:
        """Deletes the code contexts the run_code tool made (sync Sandbox)."""
        self.tools.close()

    async def aclose(self) -> None:
        await self.tools.aclose()
