"""The desktop server without its display: it does not listen until the display answers, and a display that goes
away while it serves turns requests into `no_display` refusals."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.desktop_server import SERVER, free_display, host_desktop, missing_tools, request

pytest.importorskip("Xlib", reason="python-xlib is in requirements.lock: run make venv")


def test_the_server_does_not_listen_without_a_display(tmp_path):
    socket_path = tmp_path / "desktop.sock"
    argv = [sys.executable, str(SERVER), "--socket", str(socket_path), "--display", f":{free_display()}"]
    finished = subprocess.run(argv + ["--wait-display", "0.5"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1 and "not reachable" in finished.stderr
    assert not socket_path.exists()


async def test_requests_are_refused_no_display_once_xvfb_is_gone(tmp_path):
    if missing := missing_tools():
        pytest.skip(f"needs {', '.join(missing)}")
    with host_desktop(tmp_path / "desktop") as (socket_path, env):
        assert (await request(socket_path, {"op": "cursor"}))["type"] == "cursor"
        display = env["DISPLAY"]
        xvfb_pid = int(Path(f"/tmp/.X{display[1:]}-lock").read_text().strip())  # the Xvfb this test started
        os.kill(xvfb_pid, signal.SIGTERM)
        for op in ("screenshot", "cursor", "windows"):
            reply = await request(socket_path, {"op": op})
            assert reply["name"] == "no_display" and display in reply["value"], reply


def test_the_server_takes_one_screenshot_before_it_listens(tmp_path):
    """The template's snapshot is taken once the socket exists: the first screenshot's costs (PIL's lazy imports, the
    encoder's first run) are paid before it, not by each sandbox's first screenshot."""
    if missing := missing_tools():
        pytest.skip(f"needs {', '.join(missing)}")
    with host_desktop(tmp_path / "desktop"):
        log = (tmp_path / "desktop" / "desktop.log").read_text()
    warmed, listening = log.find("mvm-desktop: warm-up screenshot: screenshot in"), log.find("mvm-desktop: listening")
    assert 0 <= warmed < listening, log
