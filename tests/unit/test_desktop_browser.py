"""The live view in a real browser: Debian's chromium, driven by Playwright (`executable_path`, never a downloaded
browser), opens the noVNC page through the gateway and sees the desktop drawn on its canvas; refused tokens are
refused there too. The desktop is `desktop_installation`'s: a real x11vnc on this host's private Xvfb, reached through
the gateway's WebSocket and the relay's port forward."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import desktop_service_pb2 as api
from microvm.sandbox.v1 import desktop_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)
CHROMIUM = Path("/usr/bin/chromium")
# The canvas noVNC draws the framebuffer on, as a PNG, once it has the desktop's size (null before).
CANVAS_PNG = """(size) => {
  const canvas = document.querySelector("#screen canvas");
  if (!canvas || canvas.width !== size[0] || canvas.height !== size[1]) return null;
  return canvas.toDataURL("image/png");
}"""
# A second RFB connection from inside a loaded page (noVNC's own class): how it ended.
RFB_OUTCOME = """(url) => new Promise((done) => {
  const RFB = window.rfb.constructor, element = document.createElement("div");
  document.body.appendChild(element);
  const rfb = new RFB(element, url);
  rfb.addEventListener("connect", () => { rfb.disconnect(); done("connected"); });
  rfb.addEventListener("disconnect", (e) => done(e.detail.clean ? "closed" : "refused"));
})"""


@pytest.fixture(scope="module")
async def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (make apt installs it)")
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (make venv)")
    async with playwright_api.async_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses to run as root
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield launched
        await launched.close()


@pytest.fixture(scope="module")
async def caller(desktop_installation):
    """A tenant of its own with one `desktop` sandbox showing an xterm (so the screen is not one colour)."""
    caller = await tenant_caller(desktop_installation, f"browser-{desktop_installation.node}")
    caller.desktop = desktop_service_pb2_grpc.DesktopServiceStub(caller.channel)
    request = sandbox_api.CreateSandboxRequest(sandbox=dict(template="desktop"))
    caller.sandbox = (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox.name
    described = await caller.desktop.GetDesktop(api.GetDesktopRequest(sandbox=caller.sandbox), metadata=caller.metadata)
    if not described.vnc_port:
        pytest.skip("x11vnc is not installed on this host (make apt)")
    caller.size = (described.width, described.height)
    launch = api.DesktopActionRequest(sandbox=caller.sandbox, launch=api.LaunchAction(app="terminal"))
    await caller.desktop.DesktopAction(launch, metadata=caller.metadata, timeout=60)
    settle = api.WaitForScreenRequest(
        sandbox=caller.sandbox, until=api.SCREEN_WAIT_STABLE, timeout=duration_pb2.Duration(seconds=30)
    )
    await caller.desktop.WaitForScreen(settle, metadata=caller.metadata, timeout=60)
    return caller


async def stream(caller, **fields) -> api.CreateDesktopStreamResponse:
    request = api.CreateDesktopStreamRequest(sandbox=caller.sandbox, **fields)
    return await caller.desktop.CreateDesktopStream(request, metadata=caller.metadata, timeout=30)


async def screenshot(caller):
    from PIL import Image

    shot = await caller.desktop.Screenshot(api.ScreenshotRequest(sandbox=caller.sandbox), metadata=caller.metadata)
    return Image.open(io.BytesIO(shot.png)).convert("RGB")


async def drawn_canvas(page, size: tuple[int, int], like, tries: int = 300):
    """The page's canvas once it has the desktop's size and shows (nearly: the cursor, a blink) what `like` shows."""
    from PIL import Image

    canvas = None
    for _ in range(tries):
        data = await page.evaluate(CANVAS_PNG, list(size))
        if data:
            canvas = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")
            if same_share(canvas, like) > 0.99:
                return canvas
        await asyncio.sleep(0.1)
    return canvas


def same_share(one, other) -> float:
    """The share of pixels two images of one size have alike: every channel within 16 levels (noVNC asks for Tight
    encoding, whose JPEG rectangles are lossy: a title bar's gradient comes back a few levels off)."""
    from PIL import ImageChops

    if one.size != other.size:
        return 0.0
    red, green, blue = ImageChops.difference(one, other).split()
    largest = ImageChops.lighter(ImageChops.lighter(red, green), blue).histogram()
    return sum(largest[:17]) / (one.width * one.height)


@pytest.mark.parametrize("view_only", [True, False])
async def test_the_page_draws_the_desktop_on_its_canvas(browser, caller, view_only):
    opened = await stream(caller, view_only=view_only)
    page = await browser.new_page()
    try:
        response = await page.goto(opened.url)
        assert response.status == 200
        desktop = await screenshot(caller)
        canvas = await drawn_canvas(page, caller.size, desktop)
        assert canvas is not None, "noVNC never drew a canvas of the desktop's size"
        assert canvas.size == caller.size
        assert len(canvas.getcolors(1 << 24) or ()) > 2, "the canvas is blank"
        assert same_share(canvas, desktop) > 0.99, "the canvas does not show the desktop"
        assert await page.text_content("#status") == ("watching" if view_only else "control")
    finally:
        await page.close()


async def test_several_viewers_watch_at_once(browser, caller):
    links = [await stream(caller, view_only=view_only) for view_only in (True, True, False)]
    pages = [await browser.new_page() for _ in links]
    try:
        await asyncio.gather(*(page.goto(link.url) for page, link in zip(pages, links, strict=True)))
        desktop = await screenshot(caller)
        canvases = await asyncio.gather(*(drawn_canvas(page, caller.size, desktop) for page in pages))
        assert all(canvas is not None and same_share(canvas, desktop) > 0.99 for canvas in canvases)
    finally:
        await asyncio.gather(*(page.close() for page in pages))


async def test_an_expired_token_is_refused_by_page_and_websocket(browser, caller):
    live = await stream(caller, view_only=True)
    short = await stream(caller, view_only=True, ttl=duration_pb2.Duration(seconds=1))
    page = await browser.new_page()
    try:
        await page.goto(live.url)
        await page.wait_for_function("document.title.startsWith('connected')")
        await asyncio.sleep(2.1)  # past the short token's expiry
        assert await page.evaluate(RFB_OUTCOME, short.websocket_url) == "refused"
        assert await page.evaluate(RFB_OUTCOME, live.websocket_url) == "connected"
        refused = await page.goto(short.url)
        assert refused.status == 401 and "expired" in await page.content()
    finally:
        await page.close()


async def test_a_token_for_another_sandbox_is_refused_by_page_and_websocket(browser, caller):
    mine = await stream(caller, view_only=False)
    other = caller.sandbox.split("/")[1]
    request = sandbox_api.CreateSandboxRequest(sandbox=dict(template="desktop"))
    second = (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox.name
    try:
        theirs = mine.url.replace(other, second.split("/")[1])
        page = await browser.new_page()
        try:
            refused = await page.goto(theirs)
            assert refused.status == 403, await page.content()
            await page.goto(mine.url)
            await page.wait_for_function("document.title.startsWith('connected')")
            socket = mine.websocket_url.replace(other, second.split("/")[1])
            assert await page.evaluate(RFB_OUTCOME, socket) == "refused"
        finally:
            await page.close()
    finally:
        await caller.stub.DeleteSandbox(sandbox_api.DeleteSandboxRequest(name=second), metadata=caller.metadata)
