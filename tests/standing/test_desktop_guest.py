"""The `desktop` template in a real guest on the running installation (`make up`, `make templates`; run by `make
template-tests`): a drag on a known window, scrolling in chromium, a recording ffprobe can read, and the noVNC page
in a real browser (Debian chromium through Playwright) drawing the guest's desktop."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.templates
CHROMIUM = Path("/usr/bin/chromium")
LONG_PAGE = "data:text/html," + "".join(f"<h1 style='margin:40px'>line {n}</h1>" for n in range(200))


@pytest.fixture(scope="module")
def desktop_sandbox():
    from microvm_sandbox import Sandbox

    with Sandbox.create("desktop", timeout=900) as sandbox:
        yield sandbox


def window_titled(desktop, title: str, tries: int = 100):
    for _ in range(tries):
        found = [w for w in desktop.windows() if title in w.title]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no window titled {title!r}: {[w.title for w in desktop.windows()]}")


def test_a_drag_across_a_terminals_text_selects_it(desktop_sandbox):
    desktop = desktop_sandbox.desktop
    desktop.launch("xterm", "-title", "drag-me", "-geometry", "60x8+60+60")
    window = window_titled(desktop, "drag-me")
    desktop.left_click(*window.center)
    desktop.write("echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    desktop.press(["Return"])
    desktop.wait_until_stable(timeout=20, stable_for=0.5)
    box = (window.x, window.y, window.width, window.height)
    before = desktop.screenshot(region=box)
    # The output is the window's second line: drag along it, as a person selecting it.
    line_y = window.y + 3 * window.height // 16 + 6
    desktop.drag((window.x + 4, line_y), (window.x + window.width - 20, line_y))
    desktop.wait_until_stable(timeout=20, stable_for=0.5)
    assert desktop.screenshot(region=box) != before, "the selection is drawn"
    desktop.close(window)


def test_chromium_scrolls_a_long_page(desktop_sandbox):
    desktop = desktop_sandbox.desktop
    desktop.launch("chromium", "--new-window", LONG_PAGE)
    window = window_titled(desktop, "Chromium", tries=300)
    desktop.wait_until_stable(timeout=60, stable_for=1.0)
    x, y = window.center
    before = desktop.screenshot()
    desktop.scroll("down", 10, x, y)
    assert desktop.wait_for_change(timeout=30), "the page moved"
    desktop.wait_until_stable(timeout=30, stable_for=0.5)
    assert desktop.screenshot() != before
    desktop.close(window)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe comes with Debian's ffmpeg (make apt)")
def test_a_recording_is_a_file_ffprobe_reads(desktop_sandbox, tmp_path):
    desktop = desktop_sandbox.desktop
    with desktop.record("/tmp/standing.webm", fps=10) as recording:
        for x in range(100, 700, 60):
            desktop.move(x, 300)
            time.sleep(0.2)
    local = recording.download(tmp_path / "standing.webm")
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(local)],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    # Playable: ffprobe reads a duration (under TCG ffmpeg starts late and drops frames: less than the wall time).
    assert float(json.loads(probe.stdout)["format"]["duration"]) > 0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make apt)")
def test_the_novnc_page_draws_the_guests_desktop_in_a_real_browser(desktop_sandbox):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    desktop = desktop_sandbox.desktop
    desktop.launch("xterm", "-title", "watched", "-geometry", "80x24+100+100")  # the bare desktop is all black
    window_titled(desktop, "watched")
    desktop.wait_until_stable(timeout=30, stable_for=0.5)
    url = desktop.stream_url(view_only=True)
    size = desktop.screen_size()
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            assert page.goto(url).status == 200
            drawn = None
            for _ in range(300):
                data = page.evaluate(
                    """(size) => { const c = document.querySelector("#screen canvas");
                    return c && c.width === size[0] && c.height === size[1] ? c.toDataURL("image/png") : null; }""",
                    list(size),
                )
                if data:
                    import base64

                    drawn = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")
                    if len(drawn.getcolors(1 << 16) or range(2)) > 1:
                        break
                time.sleep(0.1)
            assert drawn is not None and drawn.size == tuple(size)
            assert len(drawn.getcolors(1 << 16) or range(2)) > 1, "the canvas shows more than one colour"
        finally:
            browser.close()
