"""`Sandbox.desktop` for synchronous code: the twins of `AsyncDesktop` and `AsyncRecording` (microvm_sandbox.desktop),
run on the sync SDK's loop.

    with Sandbox.create("desktop") as sb:
        sb.desktop.launch("terminal")
        sb.desktop.wait_until_stable()
        with sb.desktop.record("/tmp/demo.webm") as recording:
            sb.desktop.write("echo hello\\n")
        recording.download("demo.webm")
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from microvm_sandbox.desktop import AsyncDesktop, AsyncRecording
from microvm_sandbox.desktop_models import RecordingInfo, Window

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.sync_loop import Loop


class Desktop:
    """The graphical desktop of one sandbox (`sandbox.desktop`; the sync twin of `AsyncDesktop`)."""

    def __init__(self, inner: AsyncDesktop, loop: Loop) -> None:
        self.aio = inner
        self._loop = loop

    def screenshot(
        self, region: Sequence[int] | None = None, scale: float | None = None, path: str | Path | None = None
    ) -> bytes:
        """A PNG of the screen, or of `region` (x, y, width, height), scaled by `scale` in (0, 1]; also written
        to the local file `path` when given."""
        return self._loop.run(self.aio.screenshot(region, scale, path))

    def screen_size(self) -> tuple[int, int]:
        """The screen's (width, height) in pixels."""
        return self._loop.run(self.aio.screen_size())

    def cursor_position(self) -> tuple[int, int]:
        """Where the cursor is: (x, y)."""
        return self._loop.run(self.aio.cursor_position())

    def windows(self) -> builtins.list[Window]:
        """The top-level application windows."""
        return self._loop.run(self.aio.windows())

    def move(self, x: int, y: int) -> None:
        """Moves the cursor to (x, y)."""
        self._loop.run(self.aio.move(x, y))

    def left_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the left button at (x, y), or where the cursor is."""
        self._loop.run(self.aio.left_click(x, y))

    def double_click(self, x: int | None = None, y: int | None = None) -> None:
        """Double-clicks the left button at (x, y), or where the cursor is."""
        self._loop.run(self.aio.double_click(x, y))

    def right_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the right button at (x, y), or where the cursor is."""
        self._loop.run(self.aio.right_click(x, y))

    def middle_click(self, x: int | None = None, y: int | None = None) -> None:
        """Clicks the middle button at (x, y), or where the cursor is."""
        self._loop.run(self.aio.middle_click(x, y))

    def drag(self, start: Sequence[int], end: Sequence[int]) -> None:
        """Presses the left button at `start`, moves to `end` and releases it there."""
        self._loop.run(self.aio.drag(start, end))

    def scroll(self, direction: str = "down", amount: int = 1, x: int | None = None, y: int | None = None) -> None:
        """Turns the wheel `amount` steps `up`, `down`, `left` or `right`, at (x, y) or where the cursor is."""
        self._loop.run(self.aio.scroll(direction, amount, x, y))

    def write(self, text: str) -> None:
        """Types `text` (any Unicode; a newline presses Return)."""
        self._loop.run(self.aio.write(text))

    def press(self, keys: str | Sequence[str]) -> None:
        """Presses one key or combination (`"ctrl+l"`) or a list of them in order. UnknownKey lists the valid
        names."""
        self._loop.run(self.aio.press(keys))

    def launch(self, app: str, *args: str) -> int:
        """Starts an application, detached (`chromium`, `terminal`, `files` or an executable); returns its pid."""
        return self._loop.run(self.aio.launch(app, *args))

    def focus(self, window: Window | str) -> None:
        """Raises and focuses a window (a Window or its id)."""
        self._loop.run(self.aio.focus(window))

    def close(self, window: Window | str) -> None:
        """Closes a window as its close button does."""
        self._loop.run(self.aio.close(window))

    def wait_for_change(self, timeout: float = 30, region: Sequence[int] | None = None) -> bool:
        """Waits until the screen (or `region`) changes: True when it did, False after `timeout` seconds."""
        return self._loop.run(self.aio.wait_for_change(timeout, region))

    def wait_until_stable(
        self, timeout: float = 30, stable_for: float = 1.0, region: Sequence[int] | None = None
    ) -> bool:
        """Waits until the screen (or `region`) has not changed for `stable_for` seconds: True when so, False
        after `timeout` seconds."""
        return self._loop.run(self.aio.wait_until_stable(timeout, stable_for, region))

    def record(self, path: str | None = None, fps: int = 10) -> Recording:
        """Starts recording the screen to `path` in the sandbox (`.webm` or `.mp4`; default one under /tmp) at
        `fps` frames per second; returns the started `Recording`, which `with` stops at the end."""
        started = self._loop.run(self.aio.record(path, fps))
        return Recording(started, self._loop)

    def stop_recording(self) -> RecordingInfo:
        """Stops the sandbox's recording, whoever started it; returns the finished file's RecordingInfo."""
        return self._loop.run(self.aio.stop_recording())

    def stream_url(self, view_only: bool = True, ttl: float = 600) -> str:
        """A URL that shows the desktop live in a browser (noVNC), for this sandbox only, good for `ttl` seconds."""
        return self._loop.run(self.aio.stream_url(view_only, ttl))

    def __repr__(self) -> str:
        return f"<Desktop {self.aio.sandbox.name}>"


class Recording:
    """A recording of the screen to a file in the sandbox (the sync twin of `AsyncRecording`)."""

    def __init__(self, inner: AsyncRecording, loop: Loop) -> None:
        self.aio = inner
        self._loop = loop

    @property
    def path(self) -> str:
        """The file in the sandbox."""
        return self.aio.path

    @property
    def info(self) -> RecordingInfo | None:
        """The finished file's RecordingInfo once stopped, else None."""
        return self.aio.info

    def stop(self) -> RecordingInfo:
        """Stops recording; returns the finished file's RecordingInfo (the same one when called again)."""
        return self._loop.run(self.aio.stop())

    def download(self, local_path: str | Path) -> Path:
        """Writes the recording to the local file `local_path` (stopping it first); returns the path."""
        return self._loop.run(self.aio.download(local_path))

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return repr(self.aio).replace("AsyncRecording", "Recording", 1)


class DesktopMethods:
    """`Sandbox`'s `desktop` (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    @property
    def desktop(self) -> Desktop:
        """The sandbox's graphical desktop (template `desktop`); see `AsyncSandbox.desktop`."""
        return Desktop(self.aio.desktop, self._loop)


__all__ = ["Desktop", "DesktopMethods", "Recording"]
