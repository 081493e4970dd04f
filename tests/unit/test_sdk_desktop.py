"""`sandbox.desktop` (async and sync) against an in-process installation whose `desktop` sandboxes reach a real desktop
server on a private Xvfb display of this host: screenshots are PNGs of the screen, input moves the real cursor and
reaches real windows, waits see the screen change, recordings download as files, refusals are the SDK's errors."""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import pytest

from microvm_sandbox import (
    AsyncSandbox,
    Client,
    DesktopMissing,
    InvalidArgumentError,
    Sandbox,
    UnknownKey,
    WindowNotFound,
)
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEBM_SIGNATURE = b"\x1a\x45\xdf\xa3"


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", png[16:24])


@pytest.fixture(scope="module")
async def sandbox(desktop_installation):
    caller = await tenant_caller(desktop_installation, f"sdkdesk-{desktop_installation.node}")
    client = AsyncClient(await desktop_installation.address("gateway"), caller.key)
    sandbox = await AsyncSandbox.create("desktop", client=client)
    sandbox.key = caller.key
    share_tmp(desktop_installation, sandbox)
    yield sandbox
    await sandbox.kill()
    await client.close()


def share_tmp(installation, sandbox) -> None:
    """Makes the simulated guest's /tmp the host's, as a real guest's is its desktop server's: the host server writes
    recordings to the host's /tmp, and the file API reads the guest's (the fake VMM's copy of the image)."""
    [rootfs] = installation.state_dir.glob(f"**/{sandbox.id}*/rootfs")
    shutil.rmtree(rootfs / "tmp")
    (rootfs / "tmp").symlink_to("/tmp")


async def find_window(desktop, title: str, present: bool = True):
    """The window titled `title` once listed (or None once it is gone, with present=False)."""
    for _ in range(200):
        window = next((w for w in await desktop.windows() if w.title == title), None)
        if (window is not None) == present:
            return window
        await asyncio.sleep(0.05)
    raise AssertionError(f"window {title!r} {'never appeared' if present else 'never went away'}")


async def changes_while_typing(desktop, box) -> bool:
    """wait_for_change's answer while one character after another is typed into the focused window (the wait
    compares with the screen as it was when it began, so typing goes on until it has seen a change)."""
    waiting = asyncio.ensure_future(desktop.wait_for_change(timeout=20, region=box))
    while not waiting.done():
        await desktop.write("x")
        await asyncio.wait([waiting], timeout=0.2)
    return waiting.result()


async def test_a_screenshot_is_a_png_of_the_screen_and_a_region_can_be_scaled_and_saved(sandbox, tmp_path):
    desktop = sandbox.desktop
    assert await desktop.screen_size() == (1024, 768)
    assert png_size(await desktop.screenshot()) == (1024, 768)
    part = await desktop.screenshot(region=(10, 20, 200, 100), scale=0.5, path=tmp_path / "part.png")
    assert png_size(part) == (100, 50) and (tmp_path / "part.png").read_bytes() == part


async def test_the_cursor_follows_move_drag_and_scroll(sandbox):
    desktop = sandbox.desktop
    await desktop.move(321, 234)
    assert await desktop.cursor_position() == (321, 234)
    await desktop.drag((100, 100), (200, 150))
    assert await desktop.cursor_position() == (200, 150)
    await desktop.scroll("down", 2, 500, 400)
    assert await desktop.cursor_position() == (500, 400)


async def test_a_launched_window_takes_typing_and_is_focused_and_closed(sandbox):
    desktop = sandbox.desktop
    pid = await desktop.launch("xterm", "-title", "sdk-desktop", "-geometry", "60x10+40+40")
    assert pid > 0
    window = await find_window(desktop, "sdk-desktop")
    assert window.pid in (0, pid) and window.width > 0
    await desktop.focus(window)
    assert (await find_window(desktop, "sdk-desktop")).focused
    await desktop.wait_until_stable(timeout=10, stable_for=0.3)
    box = (window.x, window.y, window.width, window.height)
    before = await desktop.screenshot(region=box)
    await desktop.left_click(*window.center)
    await desktop.write("echo typed-by-the-sdk")
    await desktop.press(["Return"])
    await desktop.wait_until_stable(timeout=10, stable_for=0.3)
    assert await desktop.screenshot(region=box) != before
    assert await changes_while_typing(desktop, box)
    await desktop.close(window)
    assert await find_window(desktop, "sdk-desktop", present=False) is None
    with pytest.raises(WindowNotFound):
        await desktop.focus(window.id)


async def test_waiting_on_a_still_screen_times_out_and_it_is_stable(sandbox):
    desktop = sandbox.desktop
    assert await desktop.wait_until_stable(timeout=10, stable_for=0.3)
    assert await desktop.wait_for_change(timeout=0.5, region=(1000, 740, 24, 28)) is False


async def test_refusals_are_the_sdks_errors(sandbox, desktop_installation):
    desktop = sandbox.desktop
    with pytest.raises(UnknownKey) as unknown:
        await desktop.press("ctrl+frobnicate")
    assert unknown.value.reason == "UNKNOWN_KEY" and "frobnicate" in unknown.value.message
    with pytest.raises(InvalidArgumentError) as off:
        await desktop.left_click(5000, 10)
    assert off.value.reason == "OFF_SCREEN"
    with pytest.raises(InvalidArgumentError):
        await desktop.left_click(5, None)
    plain = await AsyncSandbox.create("default", client=sandbox.client)
    try:
        with pytest.raises(DesktopMissing):
            await plain.desktop.screenshot()
    finally:
        await plain.kill()


async def test_a_recording_stops_at_the_end_of_its_block_and_downloads(sandbox, tmp_path):
    desktop = sandbox.desktop
    async with desktop.record("/tmp/sdk-recording.webm", fps=10) as recording:
        assert recording.path == "/tmp/sdk-recording.webm"
        for x in range(100, 400, 50):
            await desktop.move(x, 300)
        await desktop.wait_for_change(timeout=1)
    assert recording.info is not None and recording.info.size_bytes > 0
    local = await recording.download(tmp_path / "recording.webm")
    data = local.read_bytes()
    assert len(data) == recording.info.size_bytes and data.startswith(WEBM_SIGNATURE)
    Path(recording.info.path).unlink()  # the host's /tmp (share_tmp)


async def test_the_sync_desktop_does_the_same(sandbox, desktop_installation, tmp_path):
    gateway = await desktop_installation.address("gateway")

    def use() -> None:
        with Client(gateway, sandbox.key) as client:
            desktop = Sandbox.connect(sandbox.id, client=client).desktop
            desktop.move(64, 48)
            assert desktop.cursor_position() == (64, 48)
            png = desktop.screenshot(scale=0.25, path=tmp_path / "small.png")
            assert png_size(png) == (256, 192) and (tmp_path / "small.png").exists()
            with desktop.record() as recording:
                desktop.move(80, 60)
            assert recording.info is not None and recording.info.size_bytes > 0
            assert recording.download(tmp_path / "sync.webm").stat().st_size == recording.info.size_bytes
            Path(recording.info.path).unlink()

    await asyncio.to_thread(use)
