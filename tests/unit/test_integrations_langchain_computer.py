"""The LangChain computer tool: a recorded AIMessage's tool calls (tests/unit/data/integrations/
langchain_computer_calls.json) become the desktop calls they mean, each answered with a ToolMessage holding a text block
and the screen as a standard base64 PNG image block (its bytes the artifact); bad calls become error ToolMessages the
model can read, never exceptions; the module imports without langchain-core. On a fake desktop held to the SDK's
signatures, then through the stack against a real desktop server on a private Xvfb display (`desktop_installation`)."""

from __future__ import annotations

import asyncio
import base64
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from microvm_integrations.langchain_computer import SandboxComputerTool
from microvm_sandbox import AsyncSandbox, Client, Sandbox
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller
from tests.unit.data.integrations.fake_desktop import AsyncFakeDesktop, FakeDesktop
from tests.unit.data.integrations.fake_sandbox import PNG, recorded

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def actions(desktop) -> list[tuple]:
    """What the tool did to the desktop, without the screenshots and settling waits around each action."""
    return [call for call in desktop.calls if call[0] not in ("screenshot", "wait_until_stable")]


def tool_call(action: str, **args) -> dict:
    return {"name": "microvm_computer", "args": {"action": action, **args}, "id": f"call_{action}", "type": "tool_call"}


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", png[16:24])


def test_recorded_tool_calls_become_desktop_actions_answered_with_text_and_the_screen():
    desktop = FakeDesktop()
    tool = SandboxComputerTool(sandbox=SimpleNamespace(desktop=desktop))
    message = AIMessage(**recorded("langchain_computer_calls")["message"])
    answers = [tool.invoke(call) for call in message.tool_calls]
    assert actions(desktop) == [
        ("left_click", (512, 44)),
        ("press", ["ctrl+l"]),
        ("write", "microvm sandboxes\n"),
        ("scroll", "down", 5, (512, 400)),
        ("drag", (100, 200), (300, 220)),
        ("double_click", (240, 310)),
        ("right_click", (240, 310)),
        ("move", (600, 300)),
        ("wait_for_change", 5.0),
    ]
    assert [answer.tool_call_id for answer in answers] == [call["id"] for call in message.tool_calls]
    for answer in answers:
        assert isinstance(answer, ToolMessage) and answer.status == "success" and answer.name == "microvm_computer"
        text, image = answer.content
        assert image == {"type": "image", "base64": PNG, "mime_type": "image/png"}
        assert answer.artifact == base64.b64decode(PNG) and answer.artifact.startswith(PNG_SIGNATURE)
        assert text["type"] == "text" and text["text"].endswith("screen 1x1 pixels")  # the fake's PNG is 1x1
    assert [answer.content[0]["text"].split(";")[0] for answer in answers[1:]] == [
        "left click at (512, 44)",
        "pressed ctrl+l",
        "typed 18 characters",
        "scrolled down 5 at (512, 400)",
        "dragged from (100, 200) to (300, 220)",
        "double click at (240, 310)",
        "right click at the cursor",
        "moved the cursor to (600, 300)",
        "the screen changed",
    ]
    assert answers[0].content[0]["text"] == "screen 1x1 pixels"


def test_plain_arguments_answer_the_content_alone():
    tool = SandboxComputerTool(sandbox=FakeDesktop())
    assert set(tool.args) == {"action", "x", "y", "to_x", "to_y", "text", "keys", "direction", "amount", "timeout"}
    text, image = tool.invoke({"action": "move", "x": 3, "y": 4})
    assert text == {"type": "text", "text": "moved the cursor to (3, 4); screen 1x1 pixels"} and image["base64"] == PNG


def test_bad_calls_become_error_tool_messages_naming_the_problem():
    desktop = FakeDesktop()
    tool = SandboxComputerTool(sandbox=desktop)
    answers = [tool.invoke(call) for call in recorded("langchain_computer_calls")["bad"]]
    assert all(isinstance(a, ToolMessage) and a.status == "error" and a.artifact is None for a in answers)
    texts = [answer.content for answer in answers]
    assert all(text.startswith("error: ") for text in texts)
    assert "action: Input should be 'screenshot'" in texts[0] and "'wait_for_change'" in texts[0]
    assert texts[1] == "error: move: give both `x` and `y`, or neither"
    assert texts[2] == "error: drag needs `to_x` and `to_y`"
    assert texts[3] == "error: type needs `text`, a non-empty string"
    assert texts[4].startswith("error: INVALID_ARGUMENT: unknown key 'frobnicate'; valid: ") and "return" in texts[4]
    assert texts[5] == "error: INVALID_ARGUMENT: (2000, 10) is off the 1024x768 screen"
    assert "direction: Input should be 'up', 'down', 'left' or 'right'" in texts[6]
    assert "x: Input should be greater than or equal to 0" in texts[7]
    assert "action: Field required" in texts[8]
    assert actions(desktop) == []


def test_an_async_desktop_is_driven_through_ainvoke():
    desktop = AsyncFakeDesktop()
    tool = SandboxComputerTool(sandbox=SimpleNamespace(desktop=desktop), settle_seconds=0)
    answer = asyncio.run(tool.ainvoke(tool_call("left_click", x=7, y=8)))
    assert answer.status == "success" and answer.content[1]["base64"] == PNG
    assert desktop.calls == [("left_click", (7, 8)), ("screenshot",)]  # settle_seconds=0: no waiting
    with pytest.raises(TypeError, match="asynchronous"):
        tool.invoke(tool_call("screenshot"))


def test_the_module_imports_without_langchain_and_says_what_to_install():
    script = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "from microvm_integrations.langchain_computer import SandboxComputerTool\n"
        "try:\n    SandboxComputerTool(sandbox=None)\nexcept ImportError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install langchain-core" in done.stdout


# --- through the stack, on a real desktop server -----------------------------------------------------------------
def find_window(desktop, title: str):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        window = next((w for w in desktop.windows() if w.title == title), None)
        if window is not None:
            return window
        time.sleep(0.05)
    raise AssertionError(f"window {title!r} never appeared")


@pytest.fixture(scope="module")
async def account(desktop_installation) -> tuple[str, str]:
    """The gateway's address and a developer's key of a tenant of this module's own."""
    caller = await tenant_caller(desktop_installation, f"lcdesk-{desktop_installation.node}")
    return await desktop_installation.address("gateway"), caller.key


async def test_the_tool_drives_a_real_desktop_sandbox(account):
    def agent_steps() -> dict:
        with Client(*account) as client, Sandbox.create("desktop", client=client) as sandbox:
            desktop, tool = sandbox.desktop, SandboxComputerTool(sandbox=sandbox, settle_seconds=1)
            seen = {"screenshot": tool.invoke(tool_call("screenshot"))}
            desktop.launch("xterm", "-title", "lc-computer")
            window = find_window(desktop, "lc-computer")
            box = (window.x, window.y, window.width, window.height)
            seen["click"] = tool.invoke(tool_call("left_click", x=window.center[0], y=window.center[1]))
            before = desktop.screenshot(region=box)
            seen["type"] = tool.invoke(tool_call("type", text="echo from-langchain"))
            seen["key"] = tool.invoke(tool_call("key", keys="Return"))
            seen["changed"] = desktop.screenshot(region=box) != before
            seen["move"] = tool.invoke(tool_call("move", x=300, y=200))
            seen["cursor"] = desktop.cursor_position()
            seen["still"] = tool.invoke(tool_call("wait_for_change", timeout=0.5))
            seen["off"] = tool.invoke(tool_call("left_click", x=5000, y=5))
            seen["unknown"] = tool.invoke(tool_call("key", keys="ctrl+frobnicate"))
            desktop.close(window)
            return seen

    seen = await asyncio.to_thread(agent_steps)
    shot = seen["screenshot"]
    assert shot.status == "success" and png_size(shot.artifact) == (1024, 768)
    assert base64.b64decode(shot.content[1]["base64"]) == shot.artifact
    assert shot.content[0]["text"] == "screen 1024x768 pixels"
    for name in ("click", "type", "key", "move"):
        assert seen[name].status == "success" and png_size(seen[name].artifact) == (1024, 768), seen[name].content
    assert seen["key"].content[0]["text"] == "pressed Return; screen 1024x768 pixels"
    assert seen["changed"] and seen["cursor"] == (300, 200)
    assert seen["still"].content[0]["text"] == "the screen did not change within 0.5 s; screen 1024x768 pixels"
    assert seen["off"].status == "error" and "off the 1024x768 screen" in seen["off"].content
    assert seen["unknown"].status == "error" and "INVALID_ARGUMENT: unknown key 'frobnicate'" in seen["unknown"].content


async def test_an_async_sandbox_is_driven_through_ainvoke(account):
    async with AsyncClient(*account) as client:
        sandbox = await AsyncSandbox.create("desktop", client=client)
        try:
            tool = SandboxComputerTool(sandbox=sandbox)
            moved = await tool.ainvoke(tool_call("move", x=120, y=90))
            assert moved.status == "success" and png_size(moved.artifact) == (1024, 768)
            assert await sandbox.desktop.cursor_position() == (120, 90)
        finally:
            await sandbox.kill()
