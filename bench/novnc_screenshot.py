"""The picture in docs/desktop.md: the live view's noVNC page in a real browser, showing a real guest's desktop.

On the running installation (`make up`, then `make templates` builds `desktop`), with Debian's chromium (`make apt`):

    .venv/bin/python -m bench.novnc_screenshot [docs/images/desktop-novnc.png]

Creates a `desktop` sandbox, opens a terminal and the file manager in it, opens `sb.desktop.stream_url()` in
headless chromium (Playwright with `executable_path`; no browser is downloaded) at 1024x768, waits until noVNC has
drawn the desktop, saves a screenshot of the page and deletes the sandbox.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from microvm_sandbox import Sandbox

CHROMIUM = "/usr/bin/chromium"
OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "desktop-novnc.png"
# How many colours a sample of the canvas shows (0 until it has the desktop's size): a drawn desktop has many.
CANVAS_COLOURS = """(size) => {
  const canvas = document.querySelector("#screen canvas");
  if (!canvas || canvas.width !== size[0] || canvas.height !== size[1]) return 0;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data, seen = new Set();
  for (let i = 0; i < data.length; i += 4 * 97) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return seen.size;
}"""


def window(desktop, pid: int):
    """The window of the process `pid` once it shows (an xterm takes a few seconds in a guest without KVM)."""
    deadline = time.monotonic() + 60
    while not (shown := [w for w in desktop.windows() if w.pid == pid]):
        if time.monotonic() > deadline:
            raise SystemExit(f"no window of process {pid} within 60 s")
        time.sleep(0.5)
    return shown[0]


def main(out: Path) -> None:
    with Sandbox.create("desktop") as sandbox:
        desktop = sandbox.desktop
        window(desktop, desktop.launch("files"))  # shown first, so it does not take the focus from the terminal
        terminal = window(desktop, desktop.launch("terminal"))
        desktop.focus(terminal)
        desktop.wait_until_stable(timeout=60)
        desktop.write("uname -srm; ls /\n")
        desktop.wait_until_stable(timeout=60)
        size = list(desktop.screen_size())
        url = desktop.stream_url(view_only=True)
        with sync_playwright() as playwright:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses to run as root
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(url)
            page.wait_for_function("document.title.startsWith('connected')", timeout=60_000)
            deadline = time.monotonic() + 60
            while page.evaluate(CANVAS_COLOURS, size) < 8:
                if time.monotonic() > deadline:
                    raise SystemExit("noVNC did not draw the desktop within 60 s")
                time.sleep(0.2)
            page.wait_for_timeout(1000)  # the updates after the first frame
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
