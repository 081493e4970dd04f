"""A LangChain tool that sees and drives a sandbox's desktop (template `desktop`, `sandbox.desktop`): screenshots,
clicks, moving, dragging, scrolling, typing, keys and waiting until the screen changes (optional extra: langchain-core).

    tool = SandboxComputerTool(sandbox=Sandbox.create("desktop"))
    tool.invoke({"action": "left_click", "x": 512, "y": 44})     # [text block, image block]: the screen after it
    tool.invoke({"name": tool.name, "args": {"action": "screenshot"}, "id": "call_1", "type": "tool_call"})

Given a tool call (what an agent's tool node passes), the answer is a ToolMessage whose content a multimodal model
reads: a text block saying what was done and the screen's size (`left click at (512, 44); screen 1024x768 pixels`),
then the screen once it settled as LangChain's standard image block (`{"type": "image", "base64": ..., "mime_type":
"image/png"}`, which the chat model integrations turn into their vendor's image). The PNG's bytes are the message's
`artifact` (response_format "content_and_artifact"): for the program, never sent to the model. Given plain
arguments, the answer is that content alone. A mistake (a missing or bad argument, a point off the screen, an
unknown key) or the sandbox's refusal is a ToolMessage with status "error" and text starting `error:`, never an
exception, so the agent can read it and try again.

The actions run through computer_use's Anthropic executor: the same dispatch, refusals and settling (at most
`settle_seconds` for the screen to stop changing before the screenshot). With an `AsyncSandbox`, use `ainvoke`.
Without langchain-core installed this module still imports; making the tool then raises ImportError.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from microvm_integrations.computer_use import SETTLE_SECONDS, AnthropicComputerExecutor
from microvm_integrations.execution import field_of, resolve, run_sync

__all__ = ["SandboxComputerTool"]

# The tool's actions, as Anthropic's computer tool names them (what the executor runs); wait_for_change is ours.
ANTHROPIC_ACTIONS = {
    "screenshot": "screenshot",
    "left_click": "left_click",
    "right_click": "right_click",
    "middle_click": "middle_click",
    "double_click": "double_click",
    "move": "mouse_move",
    "drag": "left_click_drag",
    "scroll": "scroll",
    "type": "type",
    "key": "key",
    "wait_for_change": "wait_for_change",
}
Action = Literal[
    "screenshot",
    "left_click",
    "right_click",
    "middle_click",
    "double_click",
    "move",
    "drag",
    "scroll",
    "type",
    "key",
    "wait_for_change",
]
DESCRIPTION = (
    "Sees and drives a graphical Linux desktop in an isolated microVM. action: screenshot; left_click, right_click, "
    "middle_click or double_click at x, y (default: where the cursor is); move to x, y; drag from x, y (default: the "
    "cursor) to to_x, to_y; scroll `direction` by `amount` wheel steps (at x, y if given); type `text` (a newline "
    "presses Return); key: `keys`, a key or combination such as ctrl+l or Return (several separated by spaces); "
    "wait_for_change: wait at most `timeout` seconds for the screen to change. Coordinates are screen pixels from the "
    "top left. Every answer ends with a screenshot of the screen after the action."
)


class ComputerActionError(ValueError):
    """A call whose arguments do not fit its action: said to the model as an error result."""


def anthropic_action(args: dict[str, Any]) -> dict[str, Any]:
    """The tool's arguments as an Anthropic `computer` tool_use input (what AnthropicComputerExecutor runs)."""
    action = args["action"]
    given: dict[str, Any] = {"action": ANTHROPIC_ACTIONS[action]}
    at = _pair(args, "x", "y")
    if action == "drag":
        given["coordinate"] = _pair(args, "to_x", "to_y", required=True)
        if at is not None:
            given["start_coordinate"] = at
    elif action == "move":
        given["coordinate"] = _pair(args, "x", "y", required=True)
    elif at is not None and action not in ("screenshot", "type", "key", "wait_for_change"):
        given["coordinate"] = at
    if action == "scroll":
        given["scroll_direction"], given["scroll_amount"] = args.get("direction") or "down", args.get("amount", 3)
    elif action in ("type", "key"):
        name = "text" if action == "type" else "keys"
        if not args.get(name):
            raise ComputerActionError(f"{action} needs `{name}`, a non-empty string")
        given["text"] = args[name]
    elif action == "wait_for_change":
        given["timeout"] = args.get("timeout", 10)
    return given


def _pair(args: dict[str, Any], x: str, y: str, required: bool = False) -> list[int] | None:
    if args.get(x) is None and args.get(y) is None:
        if required:
            raise ComputerActionError(f"{args['action']} needs `{x}` and `{y}`")
        return None
    if args.get(x) is None or args.get(y) is None:
        raise ComputerActionError(f"{args['action']}: give both `{x}` and `{y}`, or neither")
    return [args[x], args[y]]


def describe(args: dict[str, Any]) -> str:
    """What a call did, in a few words."""
    action = args["action"]
    at = f"({args['x']}, {args['y']})" if args.get("x") is not None else "the cursor"
    if action.endswith("_click"):
        return f"{action.replace('_', ' ')} at {at}"
    if action == "move":
        return f"moved the cursor to {at}"
    if action == "drag":
        return f"dragged from {at} to ({args['to_x']}, {args['to_y']})"
    if action == "scroll":
        return f"scrolled {args.get('direction') or 'down'} {args.get('amount', 3)} at {at}"
    if action == "type":
        return f"typed {len(args['text'])} characters"
    if action == "key":
        return f"pressed {args['keys']}"
    return ""  # a screenshot: the screen says it all


def png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk, first in every PNG
    return width, height


class DesktopExecutor(AnthropicComputerExecutor):
    """Anthropic's executor with one more action: `wait_for_change` (`timeout` seconds), answered with whether the
    screen changed and the screen once it settled."""

    async def _act(self, given: Any) -> list[dict[str, Any]]:
        if field_of(given, "action") != "wait_for_change":
            return await super()._act(given)
        timeout = float(field_of(given, "timeout"))
        changed = bool(await resolve(self.desktop.wait_for_change(timeout=timeout)))
        note = "the screen changed" if changed else f"the screen did not change within {timeout:g} s"
        return self._content(note, await self._settled_screenshot(acted=changed))


def _validation_message(error: Any) -> str:
    """A validation error as the model reads it: each bad argument and what was wrong."""
    problems = [f"{'.'.join(str(part) for part in e['loc']) or 'arguments'}: {e['msg']}" for e in error.errors()]
    return f"error: invalid arguments: {'; '.join(problems)}"


try:
    from langchain_core.tools import BaseTool, ToolException
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as missing:
    _MISSING: ImportError | None = missing

    class SandboxComputerTool:  # type: ignore[no-redef]
        def __init__(self, *_: Any, **__: Any) -> None:
            raise ImportError("SandboxComputerTool needs langchain-core: pip install langchain-core") from _MISSING

else:
    _MISSING = None

    class ComputerInput(BaseModel):
        action: Action = Field(description="what to do (see the tool's description)")
        x: int | None = Field(default=None, ge=0, description="pixels from the left: the point to act at")
        y: int | None = Field(default=None, ge=0, description="pixels from the top: the point to act at")
        to_x: int | None = Field(default=None, ge=0, description="drag: where it ends, pixels from the left")
        to_y: int | None = Field(default=None, ge=0, description="drag: where it ends, pixels from the top")
        text: str | None = Field(default=None, description="type: the text to type; a newline presses Return")
        keys: str | None = Field(default=None, description="key: e.g. `ctrl+l`, `Return`, `ctrl+a Delete`")
        direction: Literal["up", "down", "left", "right"] = Field(default="down", description="scroll: which way")
        amount: int = Field(default=3, ge=1, le=100, description="scroll: wheel steps")
        timeout: float = Field(default=10, gt=0, le=300, description="wait_for_change: seconds to wait at most")

    class SandboxComputerTool(BaseTool):  # type: ignore[no-redef]
        """Takes screenshots of and drives a sandbox's desktop; answers text and the screen as a PNG image block."""

        name: str = "microvm_computer"
        description: str = DESCRIPTION
        args_schema: type[BaseModel] = ComputerInput
        response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
        handle_tool_error: Any = True
        handle_validation_error: Any = _validation_message
        sandbox: Any = None
        settle_seconds: float = SETTLE_SECONDS
        model_config = ConfigDict(arbitrary_types_allowed=True)
        _executor: DesktopExecutor | None = PrivateAttr(default=None)

        @property
        def executor(self) -> DesktopExecutor:
            """Runs the actions on the sandbox's desktop (made on first use)."""
            if self._executor is None:
                self._executor = DesktopExecutor(self.sandbox, settle=self.settle_seconds)
            return self._executor

        def _run(self, action: str, **arguments: Any) -> tuple[list[dict[str, Any]], bytes]:
            return run_sync(self._arun(action, **arguments))

        async def _arun(self, action: str, **arguments: Any) -> tuple[list[dict[str, Any]], bytes]:
            args = {"action": action, **arguments}
            try:
                given = anthropic_action(args)
            except ComputerActionError as error:
                raise ToolException(f"error: {error}") from None
            result = await self.executor.aexecute({"id": "", "input": given})
            texts = [block["text"] for block in result["content"] if block["type"] == "text"]
            if result["is_error"]:
                raise ToolException("\n".join(texts))
            data = next(block["source"]["data"] for block in result["content"] if block["type"] == "image")
            png = base64.b64decode(data)
            said = texts[0] if action == "wait_for_change" else describe(args)
            text = {"type": "text", "text": "{}screen {}x{} pixels".format(f"{said}; " if said else "", *png_size(png))}
            return [text, {"type": "image", "base64": data, "mime_type": "image/png"}], png
