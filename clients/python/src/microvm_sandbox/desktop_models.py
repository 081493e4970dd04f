"""What the desktop methods (microvm_sandbox.desktop) take and return: a `Window`, a finished recording's
`RecordingInfo`, and the requests' parts built from plain Python values (points, regions, buttons, directions,
keys). Nothing here talks to the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from microvm.sandbox.v1 import desktop_service_pb2 as desktop_api
from microvm_sandbox.errors import InvalidArgumentError

BUTTONS = {
    "left": desktop_api.MOUSE_BUTTON_LEFT,
    "right": desktop_api.MOUSE_BUTTON_RIGHT,
    "middle": desktop_api.MOUSE_BUTTON_MIDDLE,
}
DIRECTIONS = {
    "up": desktop_api.SCROLL_DIRECTION_UP,
    "down": desktop_api.SCROLL_DIRECTION_DOWN,
    "left": desktop_api.SCROLL_DIRECTION_LEFT,
    "right": desktop_api.SCROLL_DIRECTION_RIGHT,
}
Region = tuple[int, int, int, int]  # x, y, width, height


@dataclass(frozen=True)
class Window:
    """A top-level window: its X window `id` (what `focus` and `close` take), `title`, owning `pid` (0 when
    unknown), where its content area is (`x`, `y`, `width`, `height` in screen pixels) and whether it has the input
    focus."""

    id: str
    title: str
    pid: int
    x: int
    y: int
    width: int
    height: int
    focused: bool

    @classmethod
    def from_message(cls, message: desktop_api.DesktopWindow) -> Window:
        """The window of a DesktopWindow message."""
        box = message.geometry
        return cls(message.id, message.title, message.pid, box.x, box.y, box.width, box.height, message.focused)

    @property
    def center(self) -> tuple[int, int]:
        """The middle of its content area: a point to click to reach it."""
        return self.x + self.width // 2, self.y + self.height // 2

    def to_dict(self) -> dict[str, Any]:
        """The window as plain data."""
        return asdict(self)


@dataclass(frozen=True)
class RecordingInfo:
    """A finished recording: the file's `path` in the sandbox (download it with `Recording.download` or the
    sandbox's file methods), its `size_bytes` and how many `seconds` it lasts."""

    path: str
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The recording as plain data."""
        return asdict(self)


def point(x: int, y: int) -> desktop_api.Point:
    """A Point message (coordinates are screen pixels from the top left)."""
    return desktop_api.Point(x=int(x), y=int(y))


def optional_point(x: int | None, y: int | None) -> desktop_api.Point | None:
    """A Point when both coordinates are given, None when neither (then the cursor's position)."""
    if x is None and y is None:
        return None
    if x is None or y is None:
        raise InvalidArgumentError("give both x and y, or neither (the cursor's position)", code="INVALID_ARGUMENT")
    return point(x, y)


def region(value: Sequence[int] | None) -> desktop_api.Region | None:
    """A Region message from (x, y, width, height); None for none (the whole screen)."""
    if value is None:
        return None
    if len(value) != 4:
        raise InvalidArgumentError("region is (x, y, width, height)", code="INVALID_ARGUMENT")
    x, y, width, height = (int(part) for part in value)
    return desktop_api.Region(x=x, y=y, width=width, height=height)


def button(name: str) -> desktop_api.MouseButton:
    """The MouseButton for `left`, `right` or `middle`."""
    if name not in BUTTONS:
        raise InvalidArgumentError(f"button must be left, right or middle, got {name!r}", code="INVALID_ARGUMENT")
    return BUTTONS[name]


def direction(name: str) -> desktop_api.ScrollDirection:
    """The ScrollDirection for `up`, `down`, `left` or `right`."""
    if name not in DIRECTIONS:
        raise InvalidArgumentError(f"direction must be up, down, left or right, got {name!r}", code="INVALID_ARGUMENT")
    return DIRECTIONS[name]


def key_list(keys: str | Sequence[str]) -> list[str]:
    """The keys to press in order: one combination (`"ctrl+l"`) or a list of them (`["ctrl+a", "Delete"]`)."""
    return [keys] if isinstance(keys, str) else [str(key) for key in keys]


def window_id(window: Window | str | int) -> str:
    """The id of a window given as a Window or an id."""
    return window.id if isinstance(window, Window) else str(window)


__all__ = ["RecordingInfo", "Region", "Window"]
