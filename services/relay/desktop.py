"""GuestDesktop: DesktopService on a guest, over a tunnel to its desktop server's socket (/run/mvm-desktop.sock;
its protocol: images/templates/desktop/mvm_desktop_server.py's docstring). Each call is one request line and one
answer; the bounds are checked here first so a bad call never reaches the guest."""

from __future__ import annotations

import base64
import binascii

from google.protobuf import duration_pb2

from microvm.sandbox.v1 import desktop_service_pb2 as api
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from services.relay.guest_server import GuestServer

DESKTOP_SOCKET = "/run/mvm-desktop.sock"
MAX_COORDINATE = 1 << 15
MAX_TEXT_CHARS = 10_000
MAX_KEYS = 100
MAX_WAIT_SECONDS = 300.0
BUTTONS = {api.MOUSE_BUTTON_UNSPECIFIED: "left", api.MOUSE_BUTTON_LEFT: "left", api.MOUSE_BUTTON_RIGHT: "right"}
BUTTONS[api.MOUSE_BUTTON_MIDDLE] = "middle"
DIRECTIONS = {
    api.SCROLL_DIRECTION_UNSPECIFIED: "down",
    api.SCROLL_DIRECTION_UP: "up",
    api.SCROLL_DIRECTION_DOWN: "down",
    api.SCROLL_DIRECTION_LEFT: "left",
    api.SCROLL_DIRECTION_RIGHT: "right",
}
OUTCOMES = {
    "changed": api.SCREEN_WAIT_OUTCOME_CHANGED,
    "stable": api.SCREEN_WAIT_OUTCOME_STABLE,
    "timeout": api.SCREEN_WAIT_OUTCOME_TIMEOUT,
}


def refusal(answer: dict) -> ServiceError:
    name, value = answer.get("name"), str(answer.get("value", ""))
    if name in ("bad_request", "off_screen", "unknown_key"):
        return InvalidArgument(value, reason={"off_screen": "OFF_SCREEN", "unknown_key": "UNKNOWN_KEY"}.get(name))
    if name == "not_found":
        return NotFound(value, reason="WINDOW_NOT_FOUND")
    if name == "no_display":
        return FailedPrecondition(f"the sandbox has no display: {value}", reason="DESKTOP_MISSING")
    return FailedPrecondition(f"the sandbox's desktop server failed: {value}", reason="DESKTOP_SERVER_FAILED")


def _point(point: api.Point, field: str) -> list[int]:
    if not (0 <= point.x < MAX_COORDINATE and 0 <= point.y < MAX_COORDINATE):
        raise InvalidArgument(f"{field} ({point.x}, {point.y}) is off any screen", reason="OFF_SCREEN")
    return [point.x, point.y]


def _region(region: api.Region) -> list[int]:
    if region.width < 1 or region.height < 1 or region.x < 0 or region.y < 0:
        raise InvalidArgument("region needs x, y >= 0 and width, height >= 1", reason="INVALID_REQUEST")
    if region.x + region.width > MAX_COORDINATE or region.y + region.height > MAX_COORDINATE:
        raise InvalidArgument("region is off any screen", reason="OFF_SCREEN")
    return [region.x, region.y, region.width, region.height]


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def action_request(request: api.DesktopActionRequest) -> dict:
    """The desktop server's request for one action, after checking its bounds."""
    kind = request.WhichOneof("action")
    if kind == "move":
        return {"op": "move", **dict(zip(("x", "y"), _point(request.move.to, "move.to"), strict=True))}
    if kind == "click":
        click = request.click
        message = {"op": "click", "button": BUTTONS.get(click.button, "left"), "double": click.double}
        if click.HasField("at"):
            message.update(zip(("x", "y"), _point(click.at, "click.at"), strict=True))
        return message
    if kind == "drag":
        drag = request.drag
        start, end = _point(drag.start, "drag.start"), _point(drag.end, "drag.end")
        return {"op": "drag", "from": start, "to": end, "button": BUTTONS.get(drag.button, "left")}
    if kind == "scroll":
        scroll = request.scroll
        if not 0 <= scroll.amount <= 100:
            raise InvalidArgument(f"scroll.amount must be 1-100, got {scroll.amount}", reason="INVALID_REQUEST")
        message = {"op": "scroll", "direction": DIRECTIONS.get(scroll.direction, "down"), "amount": scroll.amount or 1}
        if scroll.HasField("at"):
            message.update(zip(("x", "y"), _point(scroll.at, "scroll.at"), strict=True))
        return message
    if kind == "type":
        text = request.type.text
        if not 1 <= len(text) <= MAX_TEXT_CHARS or "\x00" in text:
            raise InvalidArgument(
                f"type.text must be 1-{MAX_TEXT_CHARS} characters without NUL, got {len(text)}",
                reason="INVALID_REQUEST",
            )
        return {"op": "type", "text": text}
    if kind == "press":
        keys = list(request.press.keys)
        if not 1 <= len(keys) <= MAX_KEYS or any(not key or len(key) > 100 for key in keys):
            raise InvalidArgument(f"press.keys must be 1-{MAX_KEYS} non-empty key names", reason="INVALID_REQUEST")
        return {"op": "press", "keys": keys}
    if kind == "launch":
        launch = request.launch
        if not launch.app or len(launch.app) > 256 or "/" in launch.app.lstrip("/") and not launch.app.startswith("/"):
            raise InvalidArgument("launch.app must name an application or an executable", reason="INVALID_REQUEST")
        return {"op": "launch", "app": launch.app, "args": list(launch.args)}
    if kind in ("focus_window", "close_window"):
        window = getattr(request, kind).id
        try:
            number = int(window, 0)  # decimal as GetDesktop lists them, or 0x hex as X tools print them
        except ValueError:
            number = -1
        if not 0 < number < 1 << 32:
            raise InvalidArgument(
                f"{kind}.id must be a window id from GetDesktop, got {window[:40]!r}", reason="INVALID_REQUEST"
            )
        return {"op": "focus" if kind == "focus_window" else "close", "id": number}
    raise InvalidArgument("the request names no action", reason="INVALID_REQUEST")


class GuestDesktop:
    def __init__(self, open_stream) -> None:
        self.server = GuestServer(
            open_stream,
            DESKTOP_SOCKET,
            "desktop server",
            "desktop: create the sandbox from the `desktop` template or one built on it",
            "DESKTOP_MISSING",
            "DESKTOP_SERVER_FAILED",
            refusal,
        )

    async def screenshot(self, request: api.ScreenshotRequest) -> api.ScreenshotResponse:
        if not 0 <= request.scale <= 1:
            raise InvalidArgument(f"scale must be in (0, 1], got {request.scale}", reason="INVALID_REQUEST")
        message: dict = {"op": "screenshot", "scale": request.scale or 1.0}
        if request.HasField("region"):
            message["region"] = _region(request.region)
        answer = await self.server.call(request.sandbox, message, "screenshot")
        try:
            png = base64.b64decode(answer.get("png", ""), validate=True)
        except (binascii.Error, ValueError):
            raise FailedPrecondition("the desktop server sent a screenshot that is not base64") from None
        return api.ScreenshotResponse(png=png, width=int(answer.get("width", 0)), height=int(answer.get("height", 0)))

    async def describe(self, request: api.GetDesktopRequest) -> api.GetDesktopResponse:
        screen = await self.server.call(request.sandbox, {"op": "screen_size"}, "screen")
        cursor = await self.server.call(request.sandbox, {"op": "cursor"}, "cursor")
        listed = await self.server.call(request.sandbox, {"op": "windows"}, "windows")
        return api.GetDesktopResponse(
            width=int(screen.get("width", 0)),
            height=int(screen.get("height", 0)),
            vnc_port=int(screen.get("vnc_port") or 0),
            vnc_view_port=int(screen.get("vnc_view_port") or 0),
            cursor=api.Point(x=int(cursor.get("x", 0)), y=int(cursor.get("y", 0))),
            windows=[
                api.DesktopWindow(
                    id=str(w.get("id", "")),
                    title=str(w.get("title") or ""),
                    pid=int(w.get("pid") or 0),
                    geometry=api.Region(
                        x=int(w.get("x", 0)),
                        y=int(w.get("y", 0)),
                        width=int(w.get("width", 0)),
                        height=int(w.get("height", 0)),
                    ),
                    focused=bool(w.get("focused")),
                )
                for w in listed.get("windows") or []
                if isinstance(w, dict)
            ],
        )

    async def act(self, request: api.DesktopActionRequest) -> api.DesktopActionResponse:
        message = action_request(request)
        expect = "launched" if message["op"] == "launch" else "done"
        try:
            answer = await self.server.call(request.sandbox, message, expect)
        except NotFound as missing:
            if message["op"] != "launch":
                raise
            raise NotFound(missing.message, reason="APP_NOT_FOUND") from None
        return api.DesktopActionResponse(pid=int(answer.get("pid") or 0))

    async def wait(self, request: api.WaitForScreenRequest) -> api.WaitForScreenResponse:
        timeout = _seconds(request.timeout) if request.HasField("timeout") else 30.0
        stable = _seconds(request.stable_for) if request.HasField("stable_for") else 1.0
        if not 0 < timeout <= MAX_WAIT_SECONDS or not 0 < stable <= MAX_WAIT_SECONDS:
            raise InvalidArgument(
                f"timeout and stable_for must be in (0, {MAX_WAIT_SECONDS:g}] s", reason="INVALID_REQUEST"
            )
        message: dict = {
            "op": "wait_for_change",
            "timeout": timeout,
            "until": "stable" if request.until == api.SCREEN_WAIT_STABLE else "change",
            "stable_ms": int(stable * 1000),
        }
        if request.HasField("region"):
            message["region"] = _region(request.region)
        answer = await self.server.call(request.sandbox, message, tuple(OUTCOMES))
        elapsed = duration_pb2.Duration()
        elapsed.FromMilliseconds(int(answer.get("elapsed_ms") or 0))
        return api.WaitForScreenResponse(outcome=OUTCOMES[answer["type"]], elapsed=elapsed)

    async def start_recording(self, request: api.StartRecordingRequest) -> api.StartRecordingResponse:
        if not 0 <= request.fps <= 30:
            raise InvalidArgument(f"fps must be 1-30, got {request.fps}", reason="INVALID_REQUEST")
        if request.path and (not request.path.startswith("/") or not request.path.endswith((".webm", ".mp4"))):
            raise InvalidArgument("path must be absolute and end in .webm or .mp4", reason="INVALID_REQUEST")
        message: dict = {"op": "record_start", "fps": request.fps or 10}
        if request.path:
            message["path"] = request.path
        answer = await self.server.call(request.sandbox, message, "recording")
        return api.StartRecordingResponse(path=str(answer.get("path", "")))

    async def stop_recording(self, request: api.StopRecordingRequest) -> api.StopRecordingResponse:
        answer = await self.server.call(request.sandbox, {"op": "record_stop"}, "recorded")
        duration = duration_pb2.Duration()
        duration.FromMilliseconds(int(float(answer.get("seconds") or 0) * 1000))
        return api.StopRecordingResponse(
            path=str(answer.get("path", "")), size_bytes=int(answer.get("bytes") or 0), duration=duration
        )
