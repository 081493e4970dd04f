"""E2B's desktop SDK (`e2b_desktop`, unmodified) on the running installation (`make up`, `make templates`; run by `make
template-tests`): its create on E2B's template name `desktop` (our `e2b-desktop`: the SDK starts Xvfb and XFCE
itself), then screenshot, clicks, typing, keys, scrolling, the screen size and the stream (x11vnc and noVNC, its page
and WebSocket through the traffic door), in a real guest through the E2B doors (docs/e2b.md)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.templates
STATE = Path(os.environ.get("MVM_STATE_DIR", Path.home() / ".microvm"))


@pytest.fixture(scope="module")
def desktop():
    e2b_desktop = pytest.importorskip("e2b_desktop")
    os.environ.setdefault("E2B_API_URL", "http://127.0.0.1:3000")
    os.environ.setdefault("E2B_SANDBOX_URL", "http://127.0.0.1:3001")
    os.environ.setdefault("E2B_API_KEY", (STATE / "admin.key").read_text().strip())
    sandbox = e2b_desktop.Sandbox.create(timeout=900)  # its default template: `desktop`
    try:
        yield sandbox
    finally:
        sandbox.kill()


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_the_sdks_own_session_is_up_with_its_screen(desktop):
    assert desktop.get_screen_size() == (1024, 768)
    shot = bytes(desktop.screenshot())
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and png_size(shot) == (1024, 768)


def test_typing_into_a_terminal_changes_the_screen_and_runs_the_command(desktop):
    desktop.commands.run("xterm -geometry 60x10+40+40 -e bash", background=True)
    assert until(lambda: desktop.get_application_windows("xterm")), "the terminal's window shows"
    before = bytes(desktop.screenshot())
    desktop.left_click(200, 100)  # inside it: focus
    desktop.write("echo typed > /tmp/e2b-desktop-typed")
    desktop.press("enter")
    assert until(lambda: desktop.files.exists("/tmp/e2b-desktop-typed")), "the typed command ran"
    assert desktop.files.read("/tmp/e2b-desktop-typed").strip() == "typed"
    assert bytes(desktop.screenshot()) != before


def until(check, seconds: float = 60.0) -> bool:
    """Polls `check` (a guest under TCG starts windows in seconds, not milliseconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:  # the SDK raises for a command that found nothing yet (xdotool search)
            pass
        time.sleep(0.5)
    return False


def test_mouse_moves_clicks_and_scrolls(desktop):
    desktop.move_mouse(300, 200)
    assert desktop.get_cursor_position() == (300, 200)
    desktop.right_click()
    desktop.press("escape")
    desktop.double_click(310, 210)
    desktop.scroll(direction="down", amount=3)
    assert desktop.get_cursor_position() == (310, 210)


def test_the_stream_serves_novnc_and_the_vnc_websocket_through_the_door(desktop):
    desktop.stream.start()  # x11vnc on the SDK's display, noVNC's proxy on 6080 (waited for by the SDK)
    try:
        url = desktop.stream.get_url()
        assert url.startswith(f"https://6080-{desktop.sandbox_id}.") and "/vnc.html?autoconnect=true" in url
        # That domain form is a reverse proxy's (deploy/e2b/nginx.conf); the door takes the same requests by headers.
        headers = {
            "E2b-Sandbox-Id": desktop.sandbox_id,
            "E2b-Sandbox-Port": "6080",
            "X-Access-Token": desktop.connection_config.sandbox_headers["X-Access-Token"],
        }

        async def page_and_greeting() -> tuple[int, str, bytes]:
            door = os.environ["E2B_SANDBOX_URL"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                async with http.get(door + "/vnc.html", headers=headers) as page:
                    status, html = page.status, await page.text()
                async with http.ws_connect(door + "/websockify", headers=headers, protocols=("binary",)) as socket:
                    return status, html, await socket.receive_bytes()

        status, html, greeting = asyncio.run(page_and_greeting())
        assert status == 200 and "<title>noVNC</title>" in html
        assert greeting.startswith(b"RFB 003.00")  # the VNC server's, through noVNC's proxy and the door
    finally:
        desktop.stream.stop()
