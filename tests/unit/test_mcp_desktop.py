"""The MCP server's computer-use tools called through the server's own tool dispatch, against an in-process
installation whose `desktop` sandboxes reach a real desktop server on a private Xvfb display of this host."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
async def tools(desktop_installation):
    from microvm_mcp import server

    caller = await tenant_caller(desktop_installation, f"mcpdesk-{desktop_installation.node}")
    client = AsyncClient(await desktop_installation.address("gateway"), caller.key)
    saved, server._client = server._client, client
    sandbox = await AsyncSandbox.create("desktop", client=client)

    async def call(name: str, **arguments):
        """The tool's whole result for screenshot, its data for the others."""
        result = await server.server.call_tool(name, {"sandbox_id": sandbox.id, **arguments})
        if name == "screenshot":
            return result
        content = result.structured_content
        if content is not None:
            return content.get("result", content) if isinstance(content, dict) else content
        return json.loads(result.content[0].text)

    call.sandbox = sandbox
    yield call
    await sandbox.kill()
    server._client = saved
    await client.close()


async def test_screenshot_is_png_image_content_of_the_screen(tools):
    result = await tools("screenshot")
    text, image = result.content
    assert text.type == "text" and text.text == "screen 1024x768 pixels"
    assert image.type == "image" and image.mime_type == "image/png"
    png = base64.b64decode(image.data)
    assert png.startswith(PNG_SIGNATURE) and struct.unpack(">II", png[16:24]) == (1024, 768)
    scaled = base64.b64decode((await tools("screenshot", scale=0.5)).content[1].data)
    assert struct.unpack(">II", scaled[16:24]) == (512, 384)


async def test_mouse_tools_move_the_real_cursor(tools):
    desktop = tools.sandbox.desktop
    assert (await tools("move_mouse", x=300, y=200))["done"] == "cursor at (300, 200)"
    assert await desktop.cursor_position() == (300, 200)
    assert "scrolled down 2" in (await tools("scroll", direction="down", amount=2, x=310, y=210))["done"]
    assert await desktop.cursor_position() == (310, 210)
    assert "left click at (320, 220)" in (await tools("click", x=320, y=220))["done"]
    assert await desktop.cursor_position() == (320, 220)


async def test_keyboard_tools_type_into_a_window_and_unknown_keys_are_refused(tools):
    desktop = tools.sandbox.desktop
    await desktop.launch("xterm", "-title", "mcp-desktop")
    window = None
    for _ in range(100):
        window = next((w for w in await desktop.windows() if w.title == "mcp-desktop"), None)
        if window:
            break
    assert window is not None
    await desktop.focus(window)
    await desktop.wait_until_stable(timeout=10, stable_for=0.3)
    box = (window.x, window.y, window.width, window.height)
    before = await desktop.screenshot(region=box)
    assert (await tools("type_text", text="echo from-mcp"))["done"] == "typed 13 characters"
    assert (await tools("press_keys", keys=["Return"]))["done"] == "pressed Return"
    await desktop.wait_until_stable(timeout=10, stable_for=0.3)
    assert await desktop.screenshot(region=box) != before
    with pytest.raises(ToolError, match="INVALID_ARGUMENT: .*frobnicate"):
        await tools("press_keys", keys=["ctrl+frobnicate"])
    with pytest.raises(ToolError, match="left button"):
        await tools("click", x=1, y=1, button="right", double=True)
    await desktop.close(window)
