"""`wait_for_change`: watches the screen (or a region) until it changes, or until it has stopped changing, so an
agent waits for the effect of its action instead of sleeping blindly.

Every POLL_SECONDS the region is grabbed, turned grey and halved in each dimension (a box filter: a change too
small to survive that is noise such as a blinking caret at worst). The changed fraction is the share of those
pixels whose grey level differs by more than PIXEL_DELTA from the reference frame. "change": the reference is the
first frame; the wait ends `changed` once the fraction exceeds `threshold`. "stable": the reference moves to every
frame that differed from it; the wait ends `stable` once no frame has differed for `stable_ms`.
"""

import asyncio
import time

import x_desktop
from desktop_base import Refused, choice, integer, number, region
from PIL import Image, ImageChops

POLL_SECONDS = 0.1
PIXEL_DELTA = 8
DEFAULT_THRESHOLD = 0.0001  # about one typed character on a 1024x768 screen
DIFFERS = [0] * (PIXEL_DELTA + 1) + [1] * (255 - PIXEL_DELTA)


def small_frame(conn, box: tuple[int, int, int, int]) -> Image.Image:
    frame = x_desktop.grab(conn, *box).convert("L")
    return frame.reduce(2) if frame.width >= 2 and frame.height >= 2 else frame


def changed_fraction(reference: Image.Image, frame: Image.Image) -> float:
    differing = ImageChops.difference(reference, frame).point(DIFFERS).histogram()[1]
    return differing / (frame.width * frame.height)


async def wait_for_change(desktop: x_desktop.XDesktop, request: dict) -> dict:
    timeout = number(request, "timeout", 0, 300, 30.0, low_open=True)
    until = choice(request, "until", ("change", "stable"), "change")
    threshold = number(request, "threshold", 0, 1, DEFAULT_THRESHOLD)
    if threshold >= 1:
        raise Refused("bad_request", "threshold is a fraction of pixels in [0, 1)")
    stable_ms = integer(request, "stable_ms", 50, 300_000, 500)
    box = region(request.get("region"), *await desktop.size())

    started = time.monotonic()
    reference = await desktop.call(small_frame, box)
    last_change = started
    while True:
        await asyncio.sleep(POLL_SECONDS)
        frame = await desktop.call(small_frame, box)
        now = time.monotonic()
        elapsed_ms = round((now - started) * 1000)
        fraction = changed_fraction(reference, frame)
        if fraction > threshold:
            if until == "change":
                return {"type": "changed", "elapsed_ms": elapsed_ms, "fraction": round(fraction, 6)}
            reference, last_change = frame, now
        elif until == "stable" and (now - last_change) * 1000 >= stable_ms:
            return {"type": "stable", "elapsed_ms": elapsed_ms}
        if now - started >= timeout:
            return {"type": "timeout", "elapsed_ms": elapsed_ms}
