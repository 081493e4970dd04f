"""The desktop template's server (images/templates/desktop/mvm_desktop_server.py), run on this host against its own
Xvfb and openbox (tests/desktop_server.py): screenshots, input that real X clients (xterm, xev) receive, windows,
waiting for a change, recording. One desktop for the module; skipped where Xvfb and friends are not installed."""

import asyncio
import base64
import io
import subprocess
import time
from pathlib import Path

import pytest

from tests.desktop_server import DesktopClient, host_desktop, missing_tools, request

Image = pytest.importorskip("PIL.Image", reason="pillow is in requirements.lock: run make venv")
pytest.importorskip("Xlib", reason="python-xlib is in requirements.lock: run make venv")


@pytest.fixture(scope="module")
def desktop(tmp_path_factory):
    if missing := missing_tools():
        pytest.skip(f"needs {', '.join(missing)} (make apt: xvfb openbox xdotool xterm ffmpeg x11-utils)")
    with host_desktop(tmp_path_factory.mktemp("desktop")) as (socket_path, env):
        yield socket_path, env
    assert not socket_path.exists(), "the server removes its socket when it stops"


@pytest.fixture
def sock(desktop):
    return desktop[0]


def png_of(reply: dict):
    assert reply["type"] == "screenshot", reply
    image = Image.open(io.BytesIO(base64.b64decode(reply["png"])))
    assert image.format == "PNG" and image.size == (reply["width"], reply["height"])
    return image


async def eventually(check, seconds: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        await asyncio.sleep(0.1)


async def window_titled(sock, title: str, seconds: float = 20) -> dict:
    async def find():
        reply = await request(sock, {"op": "windows"})
        return next((window for window in reply["windows"] if window["title"] == title), None)

    return await eventually(find, seconds, f"a window titled {title!r}")


async def xterm_writing_to(sock, path: Path, title: str, canonical: bool = False) -> dict:
    """An xterm (launched through the server) whose shell copies what is typed into `path`; focused."""
    mode = "-echo" if canonical else "-icanon -echo"
    args = ["-u8", "-title", title, "-e", "sh", "-c", f"stty {mode}; cat > {path}"]
    launched = await request(sock, {"op": "launch", "app": "xterm", "args": args})
    assert launched["type"] == "launched" and launched["pid"] > 0
    window = await window_titled(sock, title)
    assert window.get("pid") == launched["pid"]
    assert await request(sock, {"op": "focus", "id": window["id"]}) == {"type": "done"}
    await eventually(lambda: _focused(sock, window["id"]), what="the xterm focused")
    return window


async def _focused(sock, window_id: int) -> bool:
    reply = await request(sock, {"op": "windows"})
    return any(window["id"] == window_id and window["focused"] for window in reply["windows"])


async def file_text(path: Path, expected: str) -> str:
    async def read():
        return path.exists() and path.read_text(encoding="utf-8") == expected

    await eventually(read, what=f"{path} holding {expected!r}")
    return path.read_text(encoding="utf-8")


async def test_screenshot_is_a_png_of_the_screen_and_region_and_scale_shrink_it(sock):
    screen = await request(sock, {"op": "screen_size"})
    assert (screen["type"], screen["width"], screen["height"]) == ("screen", 1024, 768)
    assert screen["vnc_view_port"] == (screen["vnc_port"] + 1 if screen["vnc_port"] else 0)
    full = png_of(await request(sock, {"op": "screenshot"}))
    assert full.size == (1024, 768)
    part = png_of(await request(sock, {"op": "screenshot", "region": [10, 20, 200, 100], "scale": 0.5}))
    assert part.size == (100, 50)
    assert png_of(await request(sock, {"op": "screenshot", "scale": 0.25})).size == (256, 192)


async def test_off_screen_points_and_regions_are_refused_with_the_screen_size(sock):
    for message in (
        {"op": "move", "x": 1024, "y": 0},
        {"op": "click", "x": 5, "y": -1},
        {"op": "drag", "from": [0, 0], "to": [0, 768]},
        {"op": "screenshot", "region": [1000, 700, 100, 100]},
    ):
        reply = await request(sock, message)
        assert (reply["type"], reply["refused"], reply["name"]) == ("error", True, "off_screen"), reply
        assert (reply["width"], reply["height"]) == (1024, 768)


async def test_bad_requests_are_refused_and_the_connection_goes_on(sock):
    client = await DesktopClient.connect(sock)
    try:
        for message in (
            {"op": "warp"},
            {"op": "move", "x": "1", "y": 2},
            {"op": "click", "x": 1.5, "y": 2},
            {"op": "click", "button": "fourth"},
            {"op": "scroll", "direction": "sideways"},
            {"op": "scroll", "direction": "up", "amount": 0},
            {"op": "type", "text": ""},
            {"op": "type", "text": "x" * 10_001},
            {"op": "type", "text": "bell\x07"},
            {"op": "screenshot", "scale": 0},
            {"op": "screenshot", "format": "gif"},
            {"op": "wait_for_change", "timeout": 301},
            {"op": "focus", "id": "main"},
        ):
            reply = await client.request(message)
            assert reply["name"] == "bad_request", (message, reply)
        assert (await client.request({"op": "cursor"}))["type"] == "cursor"
    finally:
        await client.close()


async def test_move_puts_the_pointer_there(sock, desktop):
    assert await request(sock, {"op": "move", "x": 321, "y": 123}) == {"type": "done"}
    assert await request(sock, {"op": "cursor"}) == {"type": "cursor", "x": 321, "y": 123}
    where = subprocess.run(["xdotool", "getmouselocation"], env=desktop[1], capture_output=True, text=True)
    assert where.stdout.startswith("x:321 y:123 ")


async def test_typing_unicode_reaches_the_focused_terminal(sock, tmp_path):
    typed = tmp_path / "typed.txt"
    await xterm_writing_to(sock, typed, "mvm-type")
    text = 'héllo wörld 世界 ✓ A~!@#$%^&*()_+{}|:"<>? déjà vu\n'
    assert await request(sock, {"op": "type", "text": text}) == {"type": "done"}
    assert await file_text(typed, text) == text


async def test_key_combinations_and_return(sock, tmp_path):
    typed = tmp_path / "line.txt"
    await xterm_writing_to(sock, typed, "mvm-keys", canonical=True)
    await request(sock, {"op": "type", "text": "wrong", "delay_ms": 0})
    assert await request(sock, {"op": "press", "keys": "ctrl+u"}) == {"type": "done"}  # the tty's line kill
    await request(sock, {"op": "type", "text": "rightx"})
    assert await request(sock, {"op": "press", "keys": ["BackSpace", "shift+t", "Enter", "ctrl+d"]}) == {"type": "done"}
    assert await file_text(typed, "rightT\n") == "rightT\n"


async def test_unknown_key_names_are_refused_with_suggestions(sock):
    reply = await request(sock, {"op": "press", "keys": "ctrl+entre"})
    assert reply["name"] == "unknown_key" and "enter" in reply["suggestions"]
    assert "ctrl" in reply["aliases"] and "keysym" in reply["value"]
    assert (await request(sock, {"op": "press", "keys": "ctrl++"}))["type"] == "done"
    assert (await request(sock, {"op": "press", "keys": []}))["name"] == "bad_request"


async def test_clicks_drags_and_scrolls_reach_a_window(sock, desktop, tmp_path):
    log_path = tmp_path / "xev.log"
    with open(log_path, "w") as log:
        xev = subprocess.Popen(["stdbuf", "-oL", "xev", "-geometry", "400x300"], env=desktop[1], stdout=log)
    try:
        window = await window_titled(sock, "Event Tester")
        x, y = window["x"] + 200, window["y"] + 150

        def lines(kind):
            return [line for line in log_path.read_text().splitlines() if line.startswith(kind)]

        def buttons():
            text = log_path.read_text()
            return [int(part.split("button ")[1].split(",")[0]) for part in text.split("ButtonPress event")[1:]]

        assert await request(sock, {"op": "click", "x": x, "y": y}) == {"type": "done"}
        assert await request(sock, {"op": "click", "x": x, "y": y, "button": "right"}) == {"type": "done"}
        assert await request(sock, {"op": "click", "button": "middle", "double": True}) == {"type": "done"}
        await eventually(lambda: _true(buttons() == [1, 3, 2, 2]), 10, "presses of buttons 1, 3, 2, 2")
        start = (window["x"] + 50, window["y"] + 50)
        drag = {"op": "drag", "from": list(start), "to": [window["x"] + 300, window["y"] + 200]}
        assert await request(sock, drag) == {"type": "done"}
        await eventually(lambda: _true(len(lines("ButtonRelease")) >= 5), 10, "the drag's release")
        assert ", (300,200)," in log_path.read_text().split("ButtonRelease event")[-1]  # released where it ended
        scroll = {"op": "scroll", "direction": "down", "amount": 3, "x": x, "y": y}
        assert await request(sock, scroll) == {"type": "done"}
        assert await request(sock, {"op": "scroll", "direction": "left", "amount": 1}) == {"type": "done"}
        await eventually(lambda: _true(buttons()[-4:] == [5, 5, 5, 6]), 10, "wheel presses 5, 5, 5, 6")
    finally:
        xev.terminate()
        xev.wait(timeout=10)


async def _true(value: bool) -> bool:
    return value


async def test_launch_lists_focuses_and_closes_windows(sock):
    first = await request(sock, {"op": "launch", "app": "xterm", "args": ["-title", "mvm-first"]})
    second = await request(sock, {"op": "launch", "app": "terminal", "args": ["-title", "mvm-second"]})
    one, two = await window_titled(sock, "mvm-first"), await window_titled(sock, "mvm-second")
    assert one["pid"] == first["pid"] and two["pid"] == second["pid"]
    assert one["width"] > 100 and one["height"] > 50
    for window in (one, two, one):
        assert await request(sock, {"op": "focus", "id": window["id"]}) == {"type": "done"}
        await eventually(lambda window=window: _focused(sock, window["id"]), what=f"{window['title']} focused")
    for window in (one, two):
        assert await request(sock, {"op": "close", "id": window["id"]}) == {"type": "done"}

    async def gone():
        listed = (await request(sock, {"op": "windows"}))["windows"]
        return not {one["id"], two["id"]} & {window["id"] for window in listed}

    await eventually(gone, what="both windows closed")
    assert (await request(sock, {"op": "close", "id": one["id"]}))["name"] == "not_found"
    assert (await request(sock, {"op": "focus", "id": 12345}))["name"] == "not_found"
    assert (await request(sock, {"op": "launch", "app": "no-such-program-here"}))["name"] == "not_found"


async def test_wait_for_change_sees_a_window_appear_and_times_out_on_a_still_screen(sock):
    watcher = await DesktopClient.connect(sock)
    try:
        waiting = asyncio.create_task(watcher.request({"op": "wait_for_change", "timeout": 60}, timeout=90))
        await asyncio.sleep(0.5)
        assert not waiting.done(), waiting.result()
        assert (await request(sock, {"op": "screenshot"}))["type"] == "screenshot"  # other clients meanwhile
        launched = await request(sock, {"op": "launch", "app": "xterm", "args": ["-title", "mvm-change"]})
        changed = await waiting
        assert changed["type"] == "changed" and changed["elapsed_ms"] >= 0 and changed["fraction"] > 0
        window = await window_titled(sock, "mvm-change")
        assert window["pid"] == launched["pid"]
        stable = await watcher.request({"op": "wait_for_change", "until": "stable", "stable_ms": 300, "timeout": 60})
        assert stable["type"] == "stable"
        corner = {"op": "wait_for_change", "timeout": 1, "region": [1000, 744, 24, 24]}
        assert (await watcher.request(corner))["type"] == "timeout"
        await request(sock, {"op": "close", "id": window["id"]})
    finally:
        await watcher.close()


async def test_recording_gives_a_webm_ffprobe_reads_and_only_one_at_a_time(sock, tmp_path):
    path = tmp_path / "screen.webm"
    started = await request(sock, {"op": "record_start", "path": str(path), "fps": 10})
    assert started == {"type": "recording", "path": str(path)}
    again = await request(sock, {"op": "record_start", "path": str(tmp_path / "other.webm")})
    assert again["name"] == "bad_request" and again["path"] == str(path)
    await request(sock, {"op": "move", "x": 500, "y": 400})
    await asyncio.sleep(1.5)
    stopped = await request(sock, {"op": "record_stop"})
    assert stopped["type"] == "recorded" and stopped["path"] == str(path), stopped
    assert stopped["bytes"] == path.stat().st_size > 0 and stopped["seconds"] >= 1.5
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration", "-of", "csv=p=0", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    format_name, duration = probe.stdout.strip().rsplit(",", 1)
    assert "webm" in format_name and float(duration) > 0.5
    assert (await request(sock, {"op": "record_stop"}))["name"] == "bad_request"
    assert (await request(sock, {"op": "record_start", "path": str(tmp_path / "x.avi")}))["name"] == "bad_request"
