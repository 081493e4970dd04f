"""Computer-use executors: carry out a model's computer actions on a sandbox's desktop (template `desktop`,
`sandbox.desktop`) and answer with the result the vendor expects, a screenshot included.

    executor = AnthropicComputerExecutor(sandbox)        # Anthropic's `computer` tool (computer_20250124 / _20241022)
    response = client.beta.messages.create(..., tools=[executor.tool()], betas=["computer-use-2025-01-24"])
    messages.append({"role": "user", "content": executor.execute_all(response)})   # tool_result blocks

    executor = OpenAIComputerExecutor(sandbox)           # OpenAI's computer-use tool (Responses API)
    response = client.responses.create(..., tools=[executor.tool()], truncation="auto")
    next_input = executor.execute_all(response.output)   # computer_call_output items

Payloads may be dicts or the vendors' SDK objects; the executors take a sync `Sandbox` (`execute`) or an
`AsyncSandbox` (`aexecute`), or their `desktop`. An unknown action, a bad argument or a refusal of the sandbox is
never raised: Anthropic gets a tool_result with `is_error` and the reason; OpenAI, whose computer_call_output
carries only a screenshot, gets the screenshot while the reason goes to `last_error` and, in `execute_all`, a
user message after the outputs. What the desktop cannot do is refused the same way: holding keys (`hold_key`,
clicks with `text` modifiers) and the back/forward mouse buttons. `left_mouse_down` remembers the point and
`left_mouse_up` drags from it (the press is not held in between); a drag `path` goes from its first to its last point.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import time
from typing import Any

from microvm_integrations.execution import field_of, resolve, run_sync
from microvm_sandbox.errors import SandboxError

SETTLE_SECONDS = 2.0  # after an action, wait at most this long for the screen to stop changing before the screenshot
STABLE_FOR = 0.3
WHEEL_PIXELS = 100  # OpenAI scrolls in pixels; one wheel step is about this many
# A 1x1 transparent PNG: the screenshot OpenAI gets when none could be taken (the reason is in `last_error`).
BLANK_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


class ActionError(ValueError):
    """An action the executor refuses before calling the sandbox: unknown, or a missing or bad argument."""


def desktop_of(target: Any) -> Any:
    """The desktop of a sandbox, or the desktop itself."""
    return getattr(target, "desktop", target)


def _point(value: Any, name: str = "coordinate") -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ActionError(f"{name} must be [x, y], got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == int(v) for v in value):
        raise ActionError(f"{name} must be two non-negative integers, got {value!r}")
    return int(value[0]), int(value[1])


def _text(value: Any, action: str) -> str:
    if not isinstance(value, str) or not value:
        raise ActionError(f"{action} needs `text`, a non-empty string")
    return value


def _is_async(desktop: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(desktop, "screenshot", None))


class _Executor:
    def __init__(self, target: Any, *, settle: float = SETTLE_SECONDS) -> None:
        self.desktop = desktop_of(target)
        self.settle = settle
        self._pressed_at: tuple[int, int] | None = None

    async def _pause(self, seconds: float) -> None:
        if _is_async(self.desktop):
            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)

    async def _settled_screenshot(self, acted: bool) -> str:
        """The screen as base64 PNG, once it stopped changing after an action (at most `settle` seconds)."""
        if acted and self.settle > 0:
            await resolve(self.desktop.wait_until_stable(timeout=self.settle, stable_for=STABLE_FOR))
        return base64.b64encode(await resolve(self.desktop.screenshot())).decode()

    async def _size(self) -> tuple[int, int]:
        width, height = await resolve(self.desktop.screen_size())
        return int(width), int(height)

    async def _click(self, button: str, at: tuple[int, int] | None, count: int = 1) -> None:
        x, y = at if at is not None else (None, None)
        if count >= 2:
            await resolve(self.desktop.double_click(x, y))
        else:
            await resolve(getattr(self.desktop, f"{button}_click")(x, y))
        if count == 3:  # a third click on the heels of a double click: toolkits count it as a triple click
            await resolve(self.desktop.left_click(x, y))

    async def _mouse_up(self, at: tuple[int, int] | None) -> str:
        if self._pressed_at is None:
            raise ActionError("left_mouse_up without a left_mouse_down first")
        start, self._pressed_at = self._pressed_at, None
        end = at or tuple(await resolve(self.desktop.cursor_position()))
        if tuple(end) == start:
            await resolve(self.desktop.left_click(*start))
            return "clicked"
        await resolve(self.desktop.drag(start, end))
        return f"dragged from {start} to {tuple(end)}"


# --- Anthropic ------------------------------------------------------------------------------------------------
ANTHROPIC_CLICKS = {"left_click": ("left", 1), "right_click": ("right", 1), "middle_click": ("middle", 1)}
ANTHROPIC_CLICKS.update({"double_click": ("left", 2), "triple_click": ("left", 3)})
SCROLL_DIRECTIONS = ("up", "down", "left", "right")


class AnthropicComputerExecutor(_Executor):
    """Executes Anthropic `computer` tool_use blocks (`{"action": ..., "coordinate": [x, y], "text": ...}`) on a
    desktop and answers each with a tool_result: a screenshot after an action, text where the action answers text
    (`cursor_position`), or `is_error` with the reason. `settle`: seconds to wait at most for the screen to stop
    changing before the screenshot (0: none)."""

    def __init__(
        self, target: Any, *, version: str = "computer_20250124", name: str = "computer", settle: float = SETTLE_SECONDS
    ) -> None:
        super().__init__(target, settle=settle)
        self.version, self.name = version, name

    def tool(self) -> dict[str, Any]:
        """The tool definition for `tools=`, with the screen's size (sync Sandbox; `atool` for an AsyncSandbox)."""
        return run_sync(self.atool())

    async def atool(self) -> dict[str, Any]:
        width, height = await self._size()
        return {"type": self.version, "name": self.name, "display_width_px": width, "display_height_px": height}

    def execute(self, tool_use: Any) -> dict[str, Any]:
        """The tool_result block answering one `tool_use` block ({"type", "id", "name", "input"})."""
        return run_sync(self.aexecute(tool_use))

    async def aexecute(self, tool_use: Any) -> dict[str, Any]:
        tool_use_id = field_of(tool_use, "id")
        try:
            content = await self._act(field_of(tool_use, "input") or {})
        except (ActionError, SandboxError) as error:
            reason = f"{error.code}: {error.message}" if isinstance(error, SandboxError) else str(error)
            text = {"type": "text", "text": f"error: {reason}"}
            return {"type": "tool_result", "tool_use_id": tool_use_id, "content": [text], "is_error": True}
        return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": False}

    def execute_all(self, message: Any) -> list[dict[str, Any]]:
        """The tool_result blocks answering every `computer` tool_use block of an assistant message (or of its
        content list), in order; other tools' blocks are left to their own dispatcher."""
        return run_sync(self.aexecute_all(message))

    async def aexecute_all(self, message: Any) -> list[dict[str, Any]]:
        blocks = message if isinstance(message, list) else field_of(message, "content") or []
        return [
            await self.aexecute(block)
            for block in blocks
            if field_of(block, "type") == "tool_use" and field_of(block, "name") == self.name
        ]

    async def _act(self, given: Any) -> list[dict[str, Any]]:
        action = field_of(given, "action")
        coordinate = field_of(given, "coordinate")
        at = _point(coordinate) if coordinate is not None else None
        text = field_of(given, "text")
        note = ""
        if action == "screenshot":
            return self._content("", await self._settled_screenshot(acted=False))
        if action == "cursor_position":
            x, y = await resolve(self.desktop.cursor_position())
            return [{"type": "text", "text": f"X={x},Y={y}"}]
        if action in ANTHROPIC_CLICKS:
            if text:
                raise ActionError(f"{action}: holding keys while clicking (`text`) is not supported by this desktop")
            button, count = ANTHROPIC_CLICKS[action]
            await self._click(button, at, count)
        elif action == "mouse_move":
            await resolve(self.desktop.move(*self._required(at, action)))
        elif action == "left_click_drag":
            end = self._required(at, action)
            start_coordinate = field_of(given, "start_coordinate")
            if start_coordinate is not None:
                start = _point(start_coordinate, "start_coordinate")
            else:
                start = tuple(await resolve(self.desktop.cursor_position()))
            await resolve(self.desktop.drag(start, end))
        elif action == "left_mouse_down":
            self._pressed_at = at or tuple(await resolve(self.desktop.cursor_position()))
            note = "the press is held until left_mouse_up (which drags from here, or clicks)"
        elif action == "left_mouse_up":
            note = await self._mouse_up(at)
        elif action == "scroll":
            await self._scroll(given, at, text)
        elif action == "type":
            await resolve(self.desktop.write(_text(text, action)))
        elif action == "key":
            await resolve(self.desktop.press(_text(text, action).split()))
        elif action == "wait":
            duration = field_of(given, "duration", 1)
            if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not 0 <= duration <= 100:
                raise ActionError(f"wait needs `duration`, seconds in [0, 100], got {duration!r}")
            await self._pause(float(duration))
        elif action == "hold_key":
            raise ActionError("hold_key is not supported by this desktop (it presses keys, it cannot hold them)")
        else:
            raise ActionError(f"unknown action {action!r}")
        return self._content(note, await self._settled_screenshot(acted=True))

    async def _scroll(self, given: Any, at: tuple[int, int] | None, text: Any) -> None:
        direction, amount = field_of(given, "scroll_direction"), field_of(given, "scroll_amount", 3)
        if direction not in SCROLL_DIRECTIONS:
            raise ActionError(f"scroll needs `scroll_direction`, one of {', '.join(SCROLL_DIRECTIONS)}")
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 <= amount <= 100:
            raise ActionError(f"scroll_amount must be an integer 0-100, got {amount!r}")
        if text:
            raise ActionError("scroll: holding keys while scrolling (`text`) is not supported by this desktop")
        if amount:
            x, y = at if at is not None else (None, None)
            await resolve(self.desktop.scroll(direction, amount, x, y))

    @staticmethod
    def _required(at: tuple[int, int] | None, action: str) -> tuple[int, int]:
        if at is None:
            raise ActionError(f"{action} needs `coordinate`: [x, y]")
        return at

    @staticmethod
    def _content(text: str, png: str) -> list[dict[str, Any]]:
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
        return ([{"type": "text", "text": text}] if text else []) + [image]


# --- OpenAI ---------------------------------------------------------------------------------------------------
OPENAI_BUTTONS = {"left": "left", "right": "right", "middle": "middle", "wheel": "middle"}


def openai_keys(keys: Any) -> str:
    """OpenAI's keypress `keys` (held together, e.g. ["CTRL", "L"]) as one combination the desktop knows."""
    if not isinstance(keys, list) or not keys or not all(isinstance(key, str) and key for key in keys):
        raise ActionError(f"keypress needs `keys`, a non-empty list of key names, got {keys!r}")
    # Single letters lower-cased (an upper-case one would add shift); `+` joins the combination, so it is `plus`.
    return "+".join("plus" if key == "+" else key.lower() if len(key) == 1 else key for key in keys)


class OpenAIComputerExecutor(_Executor):
    """Executes OpenAI `computer_call` items (`action`: click, double_click, scroll, type, keypress, wait,
    screenshot, move, drag) on a desktop and answers each with a computer_call_output holding a screenshot.
    Pending safety checks are acknowledged only when `acknowledge(check)` returns True for every one; otherwise
    the action is not run (`last_error` says why)."""

    def __init__(self, target: Any, *, settle: float = SETTLE_SECONDS, acknowledge: Any = None) -> None:
        super().__init__(target, settle=settle)
        self.acknowledge = acknowledge
        self.last_error: str | None = None

    def tool(self, environment: str = "linux") -> dict[str, Any]:
        """The tool definition for `tools=`, with the screen's size (sync Sandbox; `atool` for an AsyncSandbox)."""
        return run_sync(self.atool(environment))

    async def atool(self, environment: str = "linux") -> dict[str, Any]:
        width, height = await self._size()
        return {
            "type": "computer_use_preview",
            "display_width": width,
            "display_height": height,
            "environment": environment,
        }

    def execute(self, call: Any) -> dict[str, Any]:
        """The computer_call_output item answering one computer_call item."""
        return run_sync(self.aexecute(call))

    async def aexecute(self, call: Any) -> dict[str, Any]:
        self.last_error = None
        acted = False
        checks = list(field_of(call, "pending_safety_checks") or [])
        try:
            if checks and not (self.acknowledge and all(self.acknowledge(check) for check in checks)):
                raise ActionError("pending safety checks were not acknowledged: the action was not run")
            actions = field_of(call, "actions")
            for action in actions if actions is not None else [field_of(call, "action")]:
                acted = await self._act(action) or acted
        except (ActionError, SandboxError) as error:
            self.last_error = f"{error.code}: {error.message}" if isinstance(error, SandboxError) else str(error)
        try:
            png = await self._settled_screenshot(acted)
        except SandboxError as error:
            self.last_error = self.last_error or f"{error.code}: {error.message}"
            png = BLANK_PNG
        output: dict[str, Any] = {
            "type": "computer_call_output",
            "call_id": field_of(call, "call_id"),
            "output": {"type": "computer_screenshot", "image_url": f"data:image/png;base64,{png}"},
        }
        if checks and self.last_error is None:
            output["acknowledged_safety_checks"] = [
                {name: field_of(check, name) for name in ("id", "code", "message")} for check in checks
            ]
        return output

    def execute_all(self, output: Any) -> list[dict[str, Any]]:
        """The items answering every computer_call of a response's `output` list (or a response), in order; when
        an action failed, a user message saying why follows."""
        return run_sync(self.aexecute_all(output))

    async def aexecute_all(self, output: Any) -> list[dict[str, Any]]:
        items = output if isinstance(output, list) else field_of(output, "output") or []
        answers: list[dict[str, Any]] = []
        errors = []
        for item in items:
            if field_of(item, "type") == "computer_call":
                answers.append(await self.aexecute(item))
                if self.last_error:
                    errors.append(f"computer action {field_of(item, 'call_id')} failed: {self.last_error}")
        if errors:
            answers.append({"role": "user", "content": "\n".join(errors)})
        return answers

    async def _act(self, action: Any) -> bool:
        """Runs one action; True when it may have changed the screen."""
        kind = field_of(action, "type")
        if kind == "screenshot":
            return False
        if kind == "wait":
            await self._pause(1.0)
            return True
        if kind in ("click", "double_click", "move"):
            at = self._xy(action)
            if kind == "move":
                await resolve(self.desktop.move(*at))
            elif kind == "double_click":
                await self._click("left", at, 2)
            else:
                button = field_of(action, "button", "left") or "left"
                if button not in OPENAI_BUTTONS:
                    raise ActionError(f"click: the {button!r} button is not supported by this desktop")
                await self._click(OPENAI_BUTTONS[button], at)
        elif kind == "scroll":
            await self._scroll(action)
        elif kind == "type":
            await resolve(self.desktop.write(_text(field_of(action, "text"), "type")))
        elif kind == "keypress":
            await resolve(self.desktop.press([openai_keys(field_of(action, "keys"))]))
        elif kind == "drag":
            path = field_of(action, "path")
            if not isinstance(path, list) or len(path) < 2:
                raise ActionError(f"drag needs `path`, at least two points, got {path!r}")
            await resolve(self.desktop.drag(self._xy(path[0]), self._xy(path[-1])))
        else:
            raise ActionError(f"unknown action {kind!r}")
        return True

    async def _scroll(self, action: Any) -> None:
        x, y = self._xy(action)
        for value, directions in (("scroll_y", ("up", "down")), ("scroll_x", ("left", "right"))):
            pixels = field_of(action, value, 0) or 0
            if not isinstance(pixels, (int, float)) or isinstance(pixels, bool):
                raise ActionError(f"scroll: {value} must be a number of pixels, got {pixels!r}")
            if pixels:
                steps = min(100, max(1, round(abs(pixels) / WHEEL_PIXELS)))
                await resolve(self.desktop.scroll(directions[pixels > 0], steps, x, y))

    @staticmethod
    def _xy(point: Any) -> tuple[int, int]:
        return _point([field_of(point, "x"), field_of(point, "y")], "x, y")


__all__ = ["ActionError", "AnthropicComputerExecutor", "OpenAIComputerExecutor", "desktop_of", "openai_keys"]
