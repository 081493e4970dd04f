"""The sandbox tools in OpenAI's function-calling shapes, and one dispatcher for the model's calls.

    tools = openai_tools()                        # chat.completions.create(..., tools=tools)
    dispatcher = OpenAIToolDispatcher(sandbox)
    for call in response.choices[0].message.tool_calls or []:
        messages.append(dispatcher.dispatch(call))  # {"role": "tool", "tool_call_id": ..., "content": ...}

The Responses API works alike: `openai_tools(api="responses")`, and a `function_call` output item is answered with
a `function_call_output` item. Calls may be dicts or the `openai` package's objects. Tool results are text: an
image the code produced is saved under `image_dir` (when given) and named in the text, or noted as omitted.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

from microvm_integrations.execution import Outcome, field_of, run_sync
from microvm_integrations.tools import SandboxTools, tool_specs

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg"}


def openai_tools(
    names: list[str] | None = None, *, api: Literal["chat_completions", "responses"] = "chat_completions"
) -> list[dict[str, Any]]:
    """The tools (all, or those `names`) as `tools=` for Chat Completions or, with api="responses", Responses."""
    if api == "responses":
        return [
            {"type": "function", "name": s.name, "description": s.description, "parameters": s.parameters}
            for s in tool_specs(names)
        ]
    return [
        {"type": "function", "function": {"name": s.name, "description": s.description, "parameters": s.parameters}}
        for s in tool_specs(names)
    ]


class OpenAIToolDispatcher:
    """Executes OpenAI tool calls on one sandbox (sync `Sandbox`: `dispatch`; `AsyncSandbox`: `adispatch`)."""

    def __init__(self, sandbox: Any, *, timeout: float | None = 300.0, image_dir: str | Path | None = None) -> None:
        self.tools = SandboxTools(sandbox, timeout=timeout)
        self.image_dir = Path(image_dir) if image_dir is not None else None

    def dispatch(self, tool_call: Any) -> dict[str, Any]:
        """The answer to one call: a Chat Completions `tool_calls` item gets a `role: tool` message, a Responses
        `function_call` item a `function_call_output` item."""
        return run_sync(self.adispatch(tool_call))

    async def adispatch(self, tool_call: Any) -> dict[str, Any]:
        function = field_of(tool_call, "function")
        if function is not None:  # Chat Completions: {"id", "type": "function", "function": {"name", "arguments"}}
            call_id = field_of(tool_call, "id")
        else:  # Responses: {"type": "function_call", "call_id", "name", "arguments"}
            call_id, function = field_of(tool_call, "call_id"), tool_call
        name, arguments = field_of(function, "name"), field_of(function, "arguments")
        outcome = await self.tools.acall(str(name), arguments)
        content = self._text(outcome, str(call_id))
        if function is tool_call:
            return {"type": "function_call_output", "call_id": call_id, "output": content}
        return {"role": "tool", "tool_call_id": call_id, "content": content}

    def dispatch_all(self, message: Any) -> list[dict[str, Any]]:
        """The answers to every call in an assistant `message` (Chat Completions) or in a Responses `output` list."""
        return run_sync(self.adispatch_all(message))

    async def adispatch_all(self, message: Any) -> list[dict[str, Any]]:
        if isinstance(message, list):
            calls = [item for item in message if field_of(item, "type") == "function_call"]
        else:
            calls = field_of(message, "tool_calls") or []
        return [await self.adispatch(call) for call in calls]

    def _text(self, outcome: Outcome, call_id: str) -> str:
        text = outcome.text or "(no output)"
        if outcome.is_error and not text.startswith("error:"):
            text = "error:\n" + text
        for number, image in enumerate(outcome.images, 1):
            if self.image_dir is None:
                text += f"\n[{image.media_type} image omitted: this tool result carries text only]"
                continue
            self.image_dir.mkdir(parents=True, exist_ok=True)
            safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in call_id)
            path = self.image_dir / f"{safe_id}-{number}.{_EXTENSIONS.get(image.media_type, 'bin')}"
            path.write_bytes(base64.b64decode(image.data))
            text += f"\n[{image.media_type} image saved to {path} on the caller's machine]"
        return text

    def close(self) -> None:
        """Deletes the code contexts the run_code tool made (sync Sandbox)."""
        self.tools.close()

    async def aclose(self) -> None:
        await self.tools.aclose()
