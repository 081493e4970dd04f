"""The X display the desktop server drives: one python-xlib connection, used from one thread, for screenshots
(XGetImage into PIL), the pointer and input (the XTEST extension).

Input goes through XTEST in-process rather than the xdotool CLI: a click measured 0.2 ms here against ~100 ms
for spawning `xdotool click`, and `xdotool type` (default 12 ms delay) dropped characters outside the keymap
(é, 世界) in xterm because it maps each onto a spare keycode and restores it at once, before the client has read
the new mapping. Here a character outside the keymap is bound to one of the spare keycodes and left bound; the
spare keycodes are reused round-robin, so a binding changes only after many other characters.
"""

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

from desktop_base import Refused
from desktop_keys import char_keysym
from PIL import Image
from Xlib import XK, X, display, error
from Xlib.ext import xtest

X_FAILURES = (error.DisplayError, error.ConnectionClosedError, ConnectionError, EOFError)
BUTTONS = {"left": 1, "middle": 2, "right": 3}
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}


class XDesktop:
    """The display named `display_name` (":0"). Every X call runs on one worker thread through `call`; a display
    that cannot be reached gives Refused("no_display") and the next call connects again."""

    def __init__(self, display_name: str):
        self.display_name = display_name
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="x11")
        self.conn: display.Display | None = None
        self.spare_keycodes: list[int] = []
        self.bound: dict[int, int] = {}  # keysym -> spare keycode it is bound to
        self.next_spare = 0

    async def call(self, function, *args):
        """function(connection, *args) on the X thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, function, args)

    def _run(self, function, args):
        try:
            if self.conn is None:
                self.conn = display.Display(self.display_name)
                self.spare_keycodes, self.bound, self.next_spare = [], {}, 0
            return function(self.conn, *args)
        except X_FAILURES as failure:
            self._drop()
            raise Refused("no_display", f"the X display {self.display_name} is not reachable: {failure}") from None

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.executor.submit(self._drop)
        self.executor.shutdown(wait=True)

    async def size(self) -> tuple[int, int]:
        return await self.call(screen_size)

    # Input: each method is one call on the X thread; callers pace multi-step gestures with asyncio.sleep.

    def key_for(self, conn: display.Display, keysym: int) -> tuple[int, bool]:
        """The keycode that gives `keysym` and whether Shift must be held; binds a spare keycode if none does."""
        for keycode, index in conn.keysym_to_keycodes(keysym):
            if index in (0, 1):
                return keycode, index == 1
        if keysym in self.bound:
            return self.bound[keysym], False
        if not self.spare_keycodes:
            first = conn.display.info.min_keycode
            count = conn.display.info.max_keycode - first + 1
            mapping = conn.get_keyboard_mapping(first, count)
            self.spare_keycodes = [first + i for i, syms in enumerate(mapping) if not any(syms)]
            if not self.spare_keycodes:
                raise Refused("internal", "the keyboard map has no spare keycode to bind a character to")
        keycode = self.spare_keycodes[self.next_spare % len(self.spare_keycodes)]
        self.next_spare += 1
        for old, code in list(self.bound.items()):
            if code == keycode:
                del self.bound[old]
                time.sleep(0.05)  # clients may still be reading key events of the old binding
        conn.change_keyboard_mapping(keycode, [(keysym, keysym)])
        conn.sync()
        self.bound[keysym] = keycode
        return keycode, False

    def tap_text(self, conn: display.Display, text: str) -> None:
        """Types `text` (already checked): press and release per character, Shift where the keymap needs it."""
        shift = conn.keysym_to_keycode(XK.XK_Shift_L)
        for char in text.replace("\r\n", "\n"):
            keycode, shifted = self.key_for(conn, char_keysym(char))
            if shifted:
                xtest.fake_input(conn, X.KeyPress, shift)
            xtest.fake_input(conn, X.KeyPress, keycode)
            xtest.fake_input(conn, X.KeyRelease, keycode)
            if shifted:
                xtest.fake_input(conn, X.KeyRelease, shift)
        conn.sync()

    def press_combo(self, conn: display.Display, keysyms: list[int]) -> None:
        """Holds the keys in order, releases them in reverse: ctrl+shift+t."""
        pressed = []
        has_shift = any(keysym in (XK.XK_Shift_L, XK.XK_Shift_R) for keysym in keysyms)
        try:
            for keysym in keysyms:
                keycode, shifted = self.key_for(conn, keysym)
                if shifted and not has_shift:  # "ctrl+T" is ctrl+shift+t
                    pressed.append(conn.keysym_to_keycode(XK.XK_Shift_L))
                    xtest.fake_input(conn, X.KeyPress, pressed[-1])
                xtest.fake_input(conn, X.KeyPress, keycode)
                pressed.append(keycode)
        finally:
            for keycode in reversed(pressed):
                xtest.fake_input(conn, X.KeyRelease, keycode)
            conn.sync()


def screen_size(conn: display.Display) -> tuple[int, int]:
    screen = conn.screen()
    return screen.width_in_pixels, screen.height_in_pixels


def cursor(conn: display.Display) -> tuple[int, int]:
    pointer = conn.screen().root.query_pointer()
    return pointer.root_x, pointer.root_y


def grab(conn: display.Display, x: int, y: int, width: int, height: int) -> Image.Image:
    """The screen's pixels in the rectangle as an RGB image (one XGetImage)."""
    raw = conn.screen().root.get_image(x, y, width, height, X.ZPixmap, 0xFFFFFFFF)
    depth = conn.screen().root_depth
    bits = next(f.bits_per_pixel for f in conn.display.info.pixmap_formats if f.depth == depth)
    lsb_first = conn.display.info.image_byte_order == X.LSBFirst
    if depth in (24, 32) and bits == 32:
        mode = "BGRX" if lsb_first else "XRGB"
    elif depth == 16 and bits == 16 and lsb_first:
        mode = "BGR;16"
    else:
        raise Refused("internal", f"unsupported screen format: depth {depth}, {bits} bits per pixel")
    data = raw.data if isinstance(raw.data, bytes) else bytes(raw.data)
    return Image.frombuffer("RGB", (width, height), data, "raw", mode, 0, 1)


def move(conn: display.Display, x: int, y: int) -> None:
    xtest.fake_input(conn, X.MotionNotify, x=x, y=y)
    conn.sync()


def button(conn: display.Display, number: int, down: bool) -> None:
    xtest.fake_input(conn, X.ButtonPress if down else X.ButtonRelease, number)
    conn.sync()


def click(conn: display.Display, number: int, times: int = 1) -> None:
    for _ in range(times):
        xtest.fake_input(conn, X.ButtonPress, number)
        xtest.fake_input(conn, X.ButtonRelease, number)
    conn.sync()
