"""A stand-in for the SDK's `Desktop` (sandbox.desktop) for the computer-use adapters' unit tests: the same methods
and arguments (a test holds it to `Desktop`'s signatures), a cursor that moves, a log of what was done, and the
SDK's own errors for what the desktop server refuses (a point off its 1024x768 screen, an unknown key name).
`AsyncFakeDesktop` is the same behind coroutines that suspend. `FakeSandbox` carries one as `desktop`."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from microvm_sandbox.errors import InvalidArgumentError, UnknownKey
from tests.unit.data.integrations.fake_sandbox import PNG

WIDTH, HEIGHT = 1024, 768
KNOWN_KEYS = {"ctrl", "alt", "shift", "super", "return", "enter", "escape", "tab", "backspace", "delete", "space"}
KNOWN_KEYS |= {"left", "right", "up", "down", "pageup", "pagedown", "home", "end", "f5", "plus"}


class FakeDesktop:
    def __init__(self) -> None:
        self.cursor = (0, 0)
        self.calls: list[tuple[Any, ...]] = []

    def _at(self, x: int | None, y: int | None) -> tuple[int, int]:
        if x is None or y is None:
            return self.cursor
        if not (0 <= x < WIDTH and 0 <= y < HEIGHT):
            raise InvalidArgumentError(
                f"({x}, {y}) is off the {WIDTH}x{HEIGHT} screen", code="INVALID_ARGUMENT", reason="OFF_SCREEN"
            )
        self.cursor = (x, y)
        return self.cursor

    def screenshot(self, region: Any = None, scale: float | None = None, path: Any = None) -> bytes:
        self.calls.append(("screenshot",))
        return base64.b64decode(PNG)

    def screen_size(self) -> tuple[int, int]:
        return WIDTH, HEIGHT

    def cursor_position(self) -> tuple[int, int]:
        return self.cursor

    def windows(self) -> list[Any]:
        return []

    def move(self, x: int, y: int) -> None:
        self.calls.append(("move", self._at(x, y)))

    def left_click(self, x: int | None = None, y: int | None = None) -> None:
        self.calls.append(("left_click", self._at(x, y)))

    def double_click(self, x: int | None = None, y: int | None = None) -> None:
        self.calls.append(("double_click", self._at(x, y)))

    def right_click(self, x: int | None = None, y: int | None = None) -> None:
        self.calls.append(("right_click", self._at(x, y)))

    def middle_click(self, x: int | None = None, y: int | None = None) -> None:
        self.calls.append(("middle_click", self._at(x, y)))

    def drag(self, start: Any, end: Any) -> None:
        self.calls.append(("drag", self._at(*start), self._at(*end)))

    def scroll(self, direction: str = "down", amount: int = 1, x: int | None = None, y: int | None = None) -> None:
        self.calls.append(("scroll", direction, amount, self._at(x, y)))

    def write(self, text: str) -> None:
        self.calls.append(("write", text))

    def press(self, keys: Any) -> None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        for combination in keys:
            for name in combination.split("+"):
                if name.lower() not in KNOWN_KEYS and len(name) != 1:
                    raise UnknownKey(
                        f"unknown key {name!r}; valid: {', '.join(sorted(KNOWN_KEYS))}",
                        code="INVALID_ARGUMENT",
                        reason="UNKNOWN_KEY",
                    )
        self.calls.append(("press", keys))

    def launch(self, app: str, *args: str) -> int:
        self.calls.append(("launch", app, args))
        return 4242

    def focus(self, window: Any) -> None:
        self.calls.append(("focus", window))

    def close(self, window: Any) -> None:
        self.calls.append(("close", window))

    def wait_for_change(self, timeout: float = 30, region: Any = None) -> bool:
        self.calls.append(("wait_for_change", timeout))
        return True

    def wait_until_stable(self, timeout: float = 30, stable_for: float = 1.0, region: Any = None) -> bool:
        self.calls.append(("wait_until_stable", timeout))
        return True


class AsyncFakeDesktop:
    """FakeDesktop's methods as coroutines that yield to the loop once (as a real call would)."""

    def __init__(self) -> None:
        self.inner = FakeDesktop()
        self.calls = self.inner.calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return method(*args, **kwargs)

        return call

    async def screenshot(self, region: Any = None, scale: float | None = None, path: Any = None) -> bytes:
        await asyncio.sleep(0)
        return self.inner.screenshot(region, scale, path)
