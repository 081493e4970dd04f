"""Computer use (docs/desktop.md): `sandbox.desktop` sees and drives the graphical desktop of a sandbox made from the
`desktop` template (or one built from it), through the DesktopService: screenshots, the mouse, the keyboard,
applications, windows, waiting for the screen, and recording it. The sync twins are in microvm_sandbox.desktop_sync.

    async with AsyncSandbox.create("desktop") as sb:
        desktop = sb.desktop
        await desktop.launch("terminal")
        await desktop.wait_until_stable()
        await desktop.write("echo hello\\n")
        png = await desktop.screenshot(path="screen.png")

Coordinates are screen pixels from the top left. A sandbox without a display raises DesktopMissing; a point off the
screen InvalidArgumentError (reason OFF_SCREEN); a key name the desktop does not know UnknownKey (its message lists
the valid ones); a window that is not there WindowNotFound.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microvm.sandbox.v1 import desktop_service_pb2 as desktop_api
from microvm_sandbox.desktop_models import (
    RecordingInfo,
    Window,
    button,
    key_list,
    optional_point,
    point,
    window_id,
)
from microvm_sandbox.desktop_models import direction as direction_of
from microvm_sandbox.desktop_models import region as region_of

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox

WAIT_GRACE = 30.0  # a wait's call deadline beyond its own timeout: the server ends the wait first


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


class AsyncDesktop:
    """The graphical desktop of one sandbox (`sandbox.desktop`): look at it, act on it, wait for it, record it."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    async def _call(self, method: str, request: Any, *, idempotent: bool = False, timeout: float | None = None) -> Any:
        client = self.sandbox.client
        return await client.call(method, request, idempotent=idempotent, timeout=timeout, stub=client.desktop_stub)

    async def _act(self, **action: Any) -> desktop_api.DesktopActionResponse:
        request = desktop_api.DesktopActionRequest(sandbox=self.sandbox.name, **action)
        reply: desktop_api.DesktopActionResponse = await self._call("DesktopAction", request)
        return reply

    # --- looking ----------------------------------------------------------------------------------------------
    async def screenshot(
        self, region: Sequence[int] | None = None, scale: float | None = None, path: str | Path | None = None
    ) -> bytes:
        """A PNG of the screen, or of `region` (x, y, width, height), scaled by `scale` in (0, 1] (default 1);
        also written to the local file `path` when given."""
        request = desktop_api.ScreenshotRequest(sandbox=self.sandbox.name, region=region_of(region), scale=scale or 0)
        png: bytes = (await self._call("Screenshot", request, idempotent=True)).png
        if path is not None:
            await asyncio.to_thread(Path(path).write_bytes, png)
        return png

    async def _describe(self) -> desktop_api.GetDesktopResponse:
        request = desktop_api.GetDesktopRequest(sandbox=self.sandbox.name)
        reply: desktop_api.GetDesktopResponse = await self._call("GetDesktop", request, idempotent=True)
        return reply

    async def screen_size(self) -> tuple[int, int]:
        """The screen's (width, height) in pixels."""
        reply = await self._describe()
        return reply.width, reply.height

    async def cursor_position(self) -> tuple[int, int]:
        """Where the cursor is: (x, y)."""
        reply = await self._describe()
        return reply.cursor.x, reply.cursor.y

    async def windows(self) -> builtins.list[Window]:
        """The top-level application windows, with their titles, places and which has the focus."""
        return [Window.from_message(window) for window in (await self._describe()).windows]

    # --- the mouse --------------------------------------------------------------------------------------------
    async def move(self, x: int, y: int) -> None:
        """Moves the cursor to (x, y)."""
        await self._act(move=desktop_api.MoveAction(to=point(x, y)))

    async def _click(self, x: int | None, y: int | None, name: str, double: bool = False) -> None:
        await self._act(click=desktop_api.ClickAction(at=optional_point(x, y), button=button(name), double=double))

    async def left_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the left button at (x, y), or where the cursor is when neither is given."""
        await self._click(x, y, "left")

    async def double_click(self, x: int | None = None, y: int | None = None) -> None:
        """Double-clicks the left button at (x, y), or where the cursor is."""
        await self._click(x, y, "left", double=True)

    async def right_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the right button at (x, y), or where the cursor is."""
        await self._click(x, y, "right")

    async def middle_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the middle button at (x, y), or where the cursor is."""
        await self._click(x, y, "middle")

    async def drag(self, start: Sequence[int], end: Sequence[int]) -> None:
        """Presses the left button at `start` (x, y), moves to `end` and releases it there."""
        drag = desktop_api.DragAction(start=point(*start), end=point(*end), button=desktop_api.MOUSE_BUTTON_LEFT)
        await self._act(drag=drag)

    async def scroll(
        self, direction: str = "down", amount: int = 1, x: int | None = None, y: int | None = None
    ) -> None:
        """Turns the wheel `amount` steps (1-100) `up`, `down`, `left` or `right`, at (x, y) or where the cursor
        is."""
        scroll = desktop_api.ScrollAction(direction=direction_of(direction), amount=amount, at=optional_point(x, y))
        await self._act(scroll=scroll)

    # --- the keyboard -----------------------------------------------------------------------------------------
    async def write(self, text: str) -> None:
        """Types `text` (any Unicode, 1-10,000 characters; a newline presses Return, a tab Tab)."""
        await self._act(type=desktop_api.TypeAction(text=text))

    async def press(self, keys: str | Sequence[str]) -> None:
        """Presses one key or combination (`"Return"`, `"ctrl+l"`) or a list of them in order. Names are X key
        names or aliases (enter, esc, ctrl, alt, shift, super, pageup, ...), case-insensitive; an unknown one
        raises UnknownKey, whose message lists the valid names."""
        await self._act(press=desktop_api.PressAction(keys=key_list(keys)))

    # --- applications and windows -----------------------------------------------------------------------------
    async def launch(self, app: str, *args: str) -> int:
        """Starts an application, detached: `chromium`, `terminal`, `files` or an executable's name, with `args`;
        returns its pid. NotFoundError when it is not installed."""
        reply = await self._act(launch=desktop_api.LaunchAction(app=app, args=list(args)))
        return int(reply.pid)

    async def focus(self, window: Window | str) -> None:
        """Raises and focuses a window (a Window or its id). WindowNotFound when it is not there."""
        await self._act(focus_window=desktop_api.WindowAction(id=window_id(window)))

    async def close(self, window: Window | str) -> None:
        """Closes a window as its close button does (it may ask first, and stay). WindowNotFound when it is not
        there."""
        await self._act(close_window=desktop_api.WindowAction(id=window_id(window)))

    # --- waiting ----------------------------------------------------------------------------------------------
    async def _wait(
        self, until: desktop_api.ScreenWait, timeout: float, region: Sequence[int] | None, stable_for: float | None
    ) -> int:
        request = desktop_api.WaitForScreenRequest(sandbox=self.sandbox.name, until=until, region=region_of(region))
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        if stable_for is not None:
            request.stable_for.FromNanoseconds(int(stable_for * 1e9))
        reply = await self._call("WaitForScreen", request, idempotent=True, timeout=timeout + WAIT_GRACE)
        return int(reply.outcome)

    async def wait_for_change(self, timeout: float = 30, region: Sequence[int] | None = None) -> bool:
        """Waits until the screen (or `region`) changes: True when it did, False when `timeout` seconds (at most
        300) passed first. Use it after an action instead of sleeping."""
        outcome = await self._wait(desktop_api.SCREEN_WAIT_CHANGE, timeout, region, None)
        return outcome == desktop_api.SCREEN_WAIT_OUTCOME_CHANGED

    async def wait_until_stable(
        self, timeout: float = 30, stable_for: float = 1.0, region: Sequence[int] | None = None
    ) -> bool:
        """Waits until the screen (or `region`) has not changed for `stable_for` seconds: True when so, False when
        `timeout` seconds (at most 300) passed first (e.g. a video plays)."""
        outcome = await self._wait(desktop_api.SCREEN_WAIT_STABLE, timeout, region, stable_for)
        return outcome == desktop_api.SCREEN_WAIT_OUTCOME_STABLE

    # --- recording --------------------------------------------------------------------------------------------
    def record(self, path: str | None = None, fps: int = 10) -> _RecordingStart:
        """Starts recording the screen to `path` in the sandbox (absolute, `.webm` or `.mp4`; default one under
        /tmp) at `fps` frames per second (1-30). Await it for an `AsyncRecording` (`stop()`, `download()`), or
        `async with` it to stop at the end. One recording at a time per sandbox."""
        return _RecordingStart(AsyncRecording(self, path or "", fps))

    async def stop_recording(self) -> RecordingInfo:
        """Stops the sandbox's recording, whoever started it (e.g. another process: `Recording.stop` is the usual
        way); returns the finished file's RecordingInfo."""
        request = desktop_api.StopRecordingRequest(sandbox=self.sandbox.name)
        reply = await self._call("StopRecording", request)
        return RecordingInfo(reply.path, reply.size_bytes, _seconds(reply.duration))

    async def stream_url(self, view_only: bool = True, ttl: float = 600) -> str:
        """A URL that shows the desktop live in a browser (noVNC), with a token for this sandbox only, good for new
        connections for `ttl` seconds (at most 3600): `view_only` watches, False also controls (a developer's key)."""
        request = desktop_api.CreateDesktopStreamRequest(sandbox=self.sandbox.name, view_only=view_only)
        request.ttl.seconds = int(ttl)
        reply = await self._call("CreateDesktopStream", request)
        url: str = reply.url
        return url

    def __repr__(self) -> str:
        return f"<AsyncDesktop {self.sandbox.name}>"


class AsyncRecording:
    """A recording of the screen to a file in the sandbox: `stop()` finishes the file, `download()` fetches it."""

    def __init__(self, desktop: AsyncDesktop, path: str, fps: int) -> None:
        self.desktop, self.path, self.fps = desktop, path, fps
        self.info: RecordingInfo | None = None
        self._started = False

    async def start(self) -> AsyncRecording:
        """Starts recording (once); returns itself."""
        if not self._started:
            request = desktop_api.StartRecordingRequest(sandbox=self.desktop.sandbox.name, path=self.path, fps=self.fps)
            self.path = (await self.desktop._call("StartRecording", request)).path
            self._started = True
        return self

    async def stop(self) -> RecordingInfo:
        """Stops recording; returns the finished file's RecordingInfo (the same one when called again)."""
        if self.info is None:
            self.info = await self.desktop.stop_recording()
            self.path = self.info.path or self.path
        return self.info

    async def download(self, local_path: str | Path) -> Path:
        """Writes the recording to the local file `local_path` (stopping it first if it still runs); returns the
        path."""
        info = await self.stop()
        await self.desktop.sandbox.files.download(info.path, local_path)
        return Path(local_path)

    def __repr__(self) -> str:
        state = "stopped" if self.info is not None else "recording" if self._started else "not started"
        return f"<AsyncRecording {self.path or '(default path)'} {state}>"


class _RecordingStart:
    """What `AsyncDesktop.record()` returns: await it, or use it with `async with` (stopped on exit)."""

    def __init__(self, recording: AsyncRecording) -> None:
        self._recording = recording

    def __await__(self) -> Generator[Any, None, AsyncRecording]:
        return self._recording.start().__await__()

    async def __aenter__(self) -> AsyncRecording:
        return await self._recording.start()

    async def __aexit__(self, *exc: object) -> None:
        await self._recording.stop()


class AsyncDesktopMethods:
    """`AsyncSandbox`'s `desktop` (the sandbox provides `name`, `client` and `files`)."""

    @property
    def desktop(self) -> AsyncDesktop:
        """The sandbox's graphical desktop (template `desktop`): screenshot, mouse, keyboard, windows, waits,
        recording (microvm_sandbox.desktop)."""
        return AsyncDesktop(self)  # type: ignore[arg-type]


__all__ = ["AsyncDesktop", "AsyncDesktopMethods", "AsyncRecording"]
