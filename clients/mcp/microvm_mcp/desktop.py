"""The MCP server's computer-use tools for a sandbox made from the `desktop` template: screenshot (image content, a PNG
the model can look at), click, move_mouse, type_text, press_keys and scroll. `register(server)` adds them to the
server. Actions answer a line of text; take a screenshot to see their effect."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from microvm_sandbox import AsyncDesktop, SandboxError

SandboxId = Annotated[str, Field(description="id returned by create_sandbox (template desktop)")]
X = Annotated[int, Field(description="column in screen pixels from the left edge", ge=0)]
Y = Annotated[int, Field(description="row in screen pixels from the top edge", ge=0)]


async def _desktop(sandbox_id: str) -> AsyncDesktop:
    from microvm_mcp import server  # the server module registers these tools: import it late

    return (await server.sandbox(sandbox_id)).desktop


def _refused(error: SandboxError) -> ToolError:
    return ToolError(f"{error.code}: {error.message}")


async def screenshot(
    sandbox_id: SandboxId,
    scale: Annotated[float, Field(description="scale the image by this factor in (0, 1]", gt=0, le=1)] = 1.0,
) -> CallToolResult:
    desktop = await _desktop(sandbox_id)
    try:
        png = await desktop.screenshot(scale=scale)
        width, height = await desktop.screen_size()
    except SandboxError as error:
        raise _refused(error) from None
    note = f"screen {width}x{height} pixels" + (f"; image scaled by {scale:g}" if scale != 1 else "")
    return CallToolResult(
        content=[
            TextContent(type="text", text=note),
            ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"),
        ]
    )


async def click(
    sandbox_id: SandboxId,
    x: X,
    y: Y,
    button: Annotated[Literal["left", "right", "middle"], Field(description="which mouse button")] = "left",
    double: Annotated[bool, Field(description="a double click (left button)")] = False,
) -> dict[str, str]:
    desktop = await _desktop(sandbox_id)
    if double and button != "left":
        raise ToolError("a double click is with the left button")
    try:
        if double:
            await desktop.double_click(x, y)
        else:
            await getattr(desktop, f"{button}_click")(x, y)
    except SandboxError as error:
        raise _refused(error) from None
    return {"done": f"{'double-' if double else ''}{button} click at ({x}, {y})"}


async def move_mouse(sandbox_id: SandboxId, x: X, y: Y) -> dict[str, str]:
    desktop = await _desktop(sandbox_id)
    try:
        await desktop.move(x, y)
    except SandboxError as error:
        raise _refused(error) from None
    return {"done": f"cursor at ({x}, {y})"}


async def type_text(
    sandbox_id: SandboxId,
    text: Annotated[str, Field(description="any Unicode, 1-10000 characters; a newline presses Return")],
) -> dict[str, str]:
    desktop = await _desktop(sandbox_id)
    try:
        await desktop.write(text)
    except SandboxError as error:
        raise _refused(error) from None
    return {"done": f"typed {len(text)} characters"}


async def press_keys(
    sandbox_id: SandboxId,
    keys: Annotated[
        list[str],
        Field(description='keys or combinations pressed in order, e.g. ["ctrl+l"], ["Return"], ["alt+F4"]'),
    ],
) -> dict[str, str]:
    desktop = await _desktop(sandbox_id)
    try:
        await desktop.press(keys)
    except SandboxError as error:
        raise _refused(error) from None
    return {"done": "pressed " + ", ".join(keys)}


async def scroll(
    sandbox_id: SandboxId,
    direction: Annotated[Literal["up", "down", "left", "right"], Field(description="which way")] = "down",
    amount: Annotated[int, Field(description="wheel steps, 1-100", ge=1, le=100)] = 3,
    x: Annotated[int | None, Field(description="where to scroll (column); empty: where the cursor is", ge=0)] = None,
    y: Annotated[int | None, Field(description="where to scroll (row); empty: where the cursor is", ge=0)] = None,
) -> dict[str, str]:
    desktop = await _desktop(sandbox_id)
    if (x is None) != (y is None):
        raise ToolError("give both x and y, or neither")
    try:
        await desktop.scroll(direction, amount, x, y)
    except SandboxError as error:
        raise _refused(error) from None
    return {"done": f"scrolled {direction} {amount}"}


def register(server: MCPServer) -> None:
    server.tool(
        description="Take a screenshot of a desktop sandbox (template `desktop`): returns the screen as a PNG image "
        "and its size. Coordinates for click, move_mouse and scroll are pixels of the full-size screen."
    )(screenshot)
    server.tool(description="Click a mouse button at a point of a desktop sandbox's screen.")(click)
    server.tool(description="Move the mouse cursor to a point of a desktop sandbox's screen.")(move_mouse)
    server.tool(description="Type text on a desktop sandbox's keyboard, into the focused window.")(type_text)
    server.tool(
        description="Press keys or key combinations on a desktop sandbox, in order (X key names or aliases such as "
        "Return, Escape, Tab, ctrl+l, ctrl+shift+t, alt+F4, pageup; an unknown name is refused with the valid ones)."
    )(press_keys)
    server.tool(description="Turn the mouse wheel on a desktop sandbox's screen.")(scroll)
