"""The desktop server of the `desktop` template: screenshots, mouse, keyboard, windows, applications and screen
recording of one X display, behind a unix socket.

    python3 mvm_desktop_server.py [--socket /run/mvm-desktop.sock] [--display :0] [--wait-display 60]

It listens only once the display answers (waiting up to --wait-display seconds, else it exits 1) and it has taken one
screenshot to warm up (see `warm`), so a socket that exists means a desktop is up (the template's ready check).
Any number of clients at once; each connection sends requests and reads replies, one JSON object per line each way,
one request at a time per connection: exactly one reply line per request. Coordinates are screen pixels, x rightwards
and y downwards from the top-left (0, 0); a point is on screen when 0 <= x < width and 0 <= y < height. Integers are
JSON integers (1.0 is refused).

Requests (`op` names the operation) and their replies:
    {"op": "screenshot", "region": [x, y, w, h]?, "scale": s?, "format": "png"?}
        -> {"type": "screenshot", "width": int, "height": int, "png": base64 str}
        region: default the whole screen; wholly on screen, w, h >= 1. scale: 0 < s <= 1, default 1; width and
        height are the PNG's: round(w * s), round(h * s), at least 1. format: only "png".
    {"op": "screen_size"} -> {"type": "screen", "width": int, "height": int, "vnc_port": int, "vnc_view_port": int}
        (the session's VNC ports on the guest's 127.0.0.1, 0 when none: control, and view-only)
    {"op": "cursor"} -> {"type": "cursor", "x": int, "y": int}
    {"op": "move", "x": int, "y": int} -> {"type": "done"}
    {"op": "click", "x": int?, "y": int?, "button": "left"|"right"|"middle"?, "double": bool?} -> {"type": "done"}
        x and y: both or neither (then where the pointer is); button default "left"; double default false.
    {"op": "drag", "from": [x, y], "to": [x, y], "button": "left"|"right"|"middle"?} -> {"type": "done"}
        press at `from`, 10 steps of motion over ~0.1 s, release at `to`.
    {"op": "scroll", "direction": "up"|"down"|"left"|"right", "amount": 1..100?, "x": int?, "y": int?}
        -> {"type": "done"}   amount: wheel clicks, default 3; x, y: move there first.
    {"op": "type", "text": str, "delay_ms": 0..200?} -> {"type": "done"}
        text: 1..10000 characters, any Unicode; "\\n" (and "\\r\\n") presses Return, "\\t" Tab; other control
        characters are refused. delay_ms between characters, default 5.
    {"op": "press", "keys": "ctrl+l" | ["ctrl+a", "Delete", ...]} -> {"type": "done"}
        one combination or a list of 1..100 pressed one after the other; a combination is at most 8 key names
        joined by "+", held in order and released in reverse. A key name, case-insensitively: an alias (enter,
        esc, ctrl, alt, shift, super/win/meta/cmd, tab, backspace, delete, pageup, up, ... plus, minus), an X keysym
        name (Return, Page_Up, F5, XF86AudioMute, eacute), or one character (an upper-case letter adds shift).
    {"op": "launch", "app": "chromium"|"terminal"|"files"|name, "args": [str]?} -> {"type": "launched", "pid": int}
        detached (its own session, stdio /dev/null, DISPLAY set); name: an executable on PATH or an absolute path.
        chromium gets --no-first-run (and --no-sandbox when the server runs as root).
    {"op": "windows"} -> {"type": "windows", "windows": [{"id": int, "title": str, "pid": int?, "x": int, "y": int,
        "width": int, "height": int, "focused": bool}]}   top-level application windows; x, y, width, height: the
        window's content area (without the window manager's frame) in screen pixels.
    {"op": "focus", "id": int} -> {"type": "done"}   raise, un-minimize and focus, through the window manager
    {"op": "close", "id": int} -> {"type": "done"}   as its close button would (_NET_CLOSE_WINDOW / WM_DELETE_WINDOW);
        the window may ask the user first (an unsaved file), so it can still be there after "done".
    {"op": "wait_for_change", "timeout": seconds?, "region": [x, y, w, h]?, "threshold": fraction?,
     "until": "change"|"stable"?, "stable_ms": int?}
        -> {"type": "changed", "elapsed_ms": int, "fraction": float} | {"type": "stable", "elapsed_ms": int}
         | {"type": "timeout", "elapsed_ms": int}
        timeout: 0 < t <= 300, default 30. threshold: 0 <= f < 1 of the compared pixels, default 0.0001.
        until: default "change" (ends when the screen differs from when the call began); "stable" ends once no
        change was seen for stable_ms (50..300000, default 500). Screen polled every 0.1 s: see screen_watch.py.
    {"op": "record_start", "path": str?, "fps": 1..30?} -> {"type": "recording", "path": str}
        path: absolute, ending .webm (VP8) or .mp4 (H.264), its directory existing, overwritten; default
        /tmp/recording-<n>.webm. fps default 10. One recording at a time (a second start: bad_request); it
        goes on when the connection that started it closes.
    {"op": "record_stop"} -> {"type": "recorded", "path": str, "bytes": int, "seconds": float}
        the file finalized (ffmpeg stopped with q); seconds: wall time recorded.

A refused request (any op): one line {"type": "error", "refused": true, "name": str, "value": str (for people),
...extra fields}; name is one of
    "bad_request"  a field is missing, of the wrong type or out of bounds, or the op is unknown
    "off_screen"   a point or region is not on the screen; extra: "width", "height"
    "unknown_key"  a key name `press` does not know; extra: "suggestions" (close names), "aliases"
    "no_display"   the X display is not reachable (gone, or never started)
    "not_found"    a window id not among `windows`, or an application not installed
    "internal"     anything else (ffmpeg failed, a bug): the server keeps serving
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import sys
import time

import screen_watch
import x_desktop
import x_windows
from desktop_apps import Launcher, Recorder
from desktop_base import Refused, choice, integer, number, optional_point, point, region
from desktop_keys import parse_keys
from PIL import Image

MAX_REQUEST_BYTES = 1024 * 1024
MAX_TEXT = 10_000
PNG_COMPRESS_LEVEL = 1  # 1024x768: ~30 ms and ~35 KB for a plain desktop against ~55 ms and ~18 KB at 6


class DesktopServer:
    def __init__(self, display_name: str, vnc_port: int = 0):
        self.vnc_port = vnc_port
        self.desktop = x_desktop.XDesktop(display_name)
        self.launcher = Launcher(display_name)
        self.recorder = Recorder(display_name)
        self.connections: set[asyncio.Task] = set()
        self.ops = {
            "screenshot": self.screenshot,
            "screen_size": self.screen_size,
            "cursor": self.cursor,
            "move": self.move,
            "click": self.click,
            "drag": self.drag,
            "scroll": self.scroll,
            "type": self.type,
            "press": self.press,
            "launch": self.launch,
            "windows": self.windows,
            "focus": self.focus,
            "close": self.close,
            "wait_for_change": lambda request: screen_watch.wait_for_change(self.desktop, request),
            "record_start": self.record_start,
            "record_stop": self.record_stop,
        }

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                except ValueError as error:
                    await send(writer, refused("bad_request", f"not a JSON object: {error}"))
                    continue
                await send(writer, await self.handle(request))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away, or sent a line over MAX_REQUEST_BYTES
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        try:
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Refused("bad_request", f"unknown op {op!r}; ops: {', '.join(self.ops)}")
            return await handler(request) or {"type": "done"}
        except Refused as refusal:
            return refused(refusal.name, refusal.value, **refusal.extra)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: say so, keep serving
            print(f"mvm-desktop: {op}: {error!r}", file=sys.stderr, flush=True)
            return refused("internal", f"{type(error).__name__}: {error}")

    async def screenshot(self, request: dict) -> dict:
        scale = number(request, "scale", 0, 1, 1.0, low_open=True)
        choice(request, "format", ("png",), "png")
        box = region(request.get("region"), *await self.desktop.size())
        image = await self.desktop.call(x_desktop.grab, *box)
        png = await asyncio.to_thread(encode_png, image, scale)  # off the X thread: others' input goes on
        return {"type": "screenshot", "width": png[0], "height": png[1], "png": png[2]}

    async def screen_size(self, request: dict) -> dict:
        width, height = await self.desktop.size()
        view = self.vnc_port + 1 if self.vnc_port else 0
        return {"type": "screen", "width": width, "height": height, "vnc_port": self.vnc_port, "vnc_view_port": view}

    async def cursor(self, request: dict) -> dict:
        x, y = await self.desktop.call(x_desktop.cursor)
        return {"type": "cursor", "x": x, "y": y}

    async def move(self, request: dict) -> None:
        x, y = point([request.get("x"), request.get("y")], "x, y", *await self.desktop.size())
        await self.desktop.call(x_desktop.move, x, y)

    async def click(self, request: dict) -> None:
        at = optional_point(request, *await self.desktop.size())
        number_ = x_desktop.BUTTONS[choice(request, "button", tuple(x_desktop.BUTTONS), "left")]
        double = request.get("double", False)
        if not isinstance(double, bool):
            raise Refused("bad_request", "double is true or false")
        if at is not None:
            await self.desktop.call(x_desktop.move, *at)
        await self.desktop.call(x_desktop.click, number_, 2 if double else 1)

    async def drag(self, request: dict) -> None:
        size = await self.desktop.size()
        start, end = point(request.get("from"), "from", *size), point(request.get("to"), "to", *size)
        number_ = x_desktop.BUTTONS[choice(request, "button", tuple(x_desktop.BUTTONS), "left")]
        await self.desktop.call(x_desktop.move, *start)
        await self.desktop.call(x_desktop.button, number_, True)
        try:
            for step in range(1, 11):
                await asyncio.sleep(0.01)
                x = start[0] + (end[0] - start[0]) * step // 10
                y = start[1] + (end[1] - start[1]) * step // 10
                await self.desktop.call(x_desktop.move, x, y)
        finally:
            await self.desktop.call(x_desktop.button, number_, False)

    async def scroll(self, request: dict) -> None:
        direction = choice(request, "direction", tuple(x_desktop.SCROLL_BUTTONS))
        amount = integer(request, "amount", 1, 100, 3)
        at = optional_point(request, *await self.desktop.size())
        if at is not None:
            await self.desktop.call(x_desktop.move, *at)
        await self.desktop.call(x_desktop.click, x_desktop.SCROLL_BUTTONS[direction], amount)

    async def type(self, request: dict) -> None:
        text = request.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= MAX_TEXT:
            raise Refused("bad_request", f"text is a string of 1..{MAX_TEXT} characters")
        bad = [char for char in text if (ord(char) < 0x20 and char not in "\n\r\t") or 0x7F <= ord(char) < 0xA0]
        if bad or any(0xD800 <= ord(char) <= 0xDFFF for char in text):
            raise Refused("bad_request", f"text holds a control character {bad[:1]!r} (only \\n, \\r, \\t type)")
        delay = integer(request, "delay_ms", 0, 200, 5) / 1000
        chunk = 1 if delay else 200  # with no delay, 200 characters per X call; others' requests interleave
        for start in range(0, len(text), chunk):
            await self.desktop.call(self.desktop.tap_text, text[start : start + chunk])
            if delay:
                await asyncio.sleep(delay)

    async def press(self, request: dict) -> None:
        for combo in parse_keys(request.get("keys")):
            await self.desktop.call(self.desktop.press_combo, combo)

    async def launch(self, request: dict) -> dict:
        return {"type": "launched", "pid": await self.launcher.launch(request)}

    async def windows(self, request: dict) -> dict:
        return {"type": "windows", "windows": await self.desktop.call(x_windows.list_windows)}

    async def focus(self, request: dict) -> None:
        await self.desktop.call(x_windows.focus, request.get("id"))

    async def close(self, request: dict) -> None:
        await self.desktop.call(x_windows.close, request.get("id"))

    async def record_start(self, request: dict) -> dict:
        fps = integer(request, "fps", 1, 30, 10)
        width, height = await self.desktop.size()
        path = await self.recorder.start(request.get("path"), fps, width - width % 2, height - height % 2)
        return {"type": "recording", "path": path}

    async def record_stop(self, request: dict) -> dict:
        return await self.recorder.stop()


def encode_png(image: Image.Image, scale: float) -> tuple[int, int, str]:
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return image.width, image.height, base64.b64encode(buffer.getvalue()).decode("ascii")


def refused(name: str, value: str, **extra) -> dict:
    return {"type": "error", "refused": True, "name": name, "value": value, **extra}


async def send(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def wait_for_display(server: DesktopServer, seconds: float) -> tuple[int, int]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await server.desktop.size()
        except Refused:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def warm(server: DesktopServer) -> None:
    """One whole screenshot, encoded and thrown away, before the server listens: the template's snapshot is taken once
    the socket exists, so PIL's lazy imports (its image plugins, on the first save), the X image path and the
    encoder's first run are paid there and not by the first screenshot of every sandbox made from it."""
    started = time.monotonic()
    reply = await server.handle({"op": "screenshot"})
    print(f"mvm-desktop: warm-up screenshot: {reply['type']} in {time.monotonic() - started:.2f} s", flush=True)


async def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default="/run/mvm-desktop.sock", help="unix socket path (default %(default)s)")
    parser.add_argument("--display", default=os.environ.get("DISPLAY") or ":0", help="X display (default :0)")
    parser.add_argument("--wait-display", type=float, default=60, help="seconds to wait for the display")
    parser.add_argument("--vnc-port", type=int, default=0, help="the session's VNC port (view-only: the next one)")
    args = parser.parse_args(argv)

    server = DesktopServer(args.display, args.vnc_port)
    try:
        width, height = await wait_for_display(server, args.wait_display)
    except Refused as refusal:
        print(f"mvm-desktop: {refusal.value}", file=sys.stderr, flush=True)
        return 1
    await warm(server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    listener = await asyncio.start_unix_server(server.serve_connection, path=args.socket, limit=MAX_REQUEST_BYTES)
    os.chmod(args.socket, 0o600)
    print(f"mvm-desktop: listening on {args.socket}; display {args.display} {width}x{height}", flush=True)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    listener.close()
    for task in list(server.connections):
        task.cancel()
    await asyncio.gather(*server.connections, return_exceptions=True)
    await server.recorder.close()
    server.desktop.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
