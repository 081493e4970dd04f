"""The unmodified e2b-desktop SDK (2.7.2) through the gateway's E2B doors: its input and screenshot calls are shell
commands (xdotool, scrot) run through envd's commands.run. Here they run on this host's private Xvfb display with
openbox (`desktop_installation`: the fake VMM runs a sandbox's processes on the host), so this proves the calls' path
through our doors, not the desktop template's contents (it lacks scrot, for one).

e2b-desktop's own `Sandbox.create()` is not used: after starting Xvfb it waits for an XFCE session (xfce4-session,
xfwm4, xfdesktop), which neither our template nor this host runs. `Sandbox.connect()` to a sandbox made with the
display in its environment is what an agent can use instead."""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import pytest
from e2b import AsyncSandbox
from e2b_desktop import Sandbox as DesktopSandbox

from tests.unit.e2b_fixtures import e2b_doors

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("scrot") is None or shutil.which("xterm") is None, reason="needs scrot and xterm"),
]


@pytest.fixture(scope="module")
async def doors(desktop_installation):
    with pytest.MonkeyPatch.context() as monkeypatch:
        async for found in e2b_doors(desktop_installation, monkeypatch):
            yield found


def any_host_xauthority(source: Path, target: Path) -> Path:
    """The display's cookie for any host name: the sandbox's processes have a host name of their own, and the
    fixture's Xauthority names this host's (libXau's format: family, address, display number, name, data)."""
    data = source.read_bytes()
    (address_length,) = struct.unpack(">H", data[2:4])
    target.write_bytes(struct.pack(">HH", 0xFFFF, 0) + data[4 + address_length :])  # FamilyWild, no address
    return target


@pytest.fixture(scope="module")
async def sandbox_id(doors, desktop_installation, tmp_path_factory):
    env = desktop_installation.display_env
    xauthority = any_host_xauthority(Path(env["XAUTHORITY"]), tmp_path_factory.mktemp("x") / "Xauthority")
    made = await AsyncSandbox.create(
        template="desktop", timeout=600, envs={"DISPLAY": env["DISPLAY"], "XAUTHORITY": str(xauthority)}
    )
    yield made.sandbox_id
    await made.kill()


async def in_thread(sandbox_id: str, act):
    """The desktop SDK is sync only: it blocks, and the installation serves from this loop."""
    return await asyncio.to_thread(lambda: act(DesktopSandbox.connect(sandbox_id)))


async def test_the_screenshot_command_makes_a_png_of_the_screen(sandbox_id, tmp_path):
    """screenshot() is `scrot --pointer <file>` then files.read and files.remove of that file. Here the command's file
    lands on the host while the file calls read the fake guest's root directory, so the command is run as the SDK
    words it, to a host path, and the file calls are envd's own tests' business."""
    shot = tmp_path / "shot.png"
    await in_thread(sandbox_id, lambda desktop: desktop.commands.run(f"scrot --pointer {shot}"))
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and struct.unpack(">II", png[16:24]) == (1024, 768)


async def test_mouse_moves_clicks_and_scrolls(sandbox_id):
    def act(desktop):
        desktop.move_mouse(200, 150)
        where = desktop.get_cursor_position()
        desktop.left_click(300, 250)
        desktop.right_click()
        desktop.double_click()
        desktop.scroll("down", 3)
        return where, desktop.get_cursor_position()

    assert await in_thread(sandbox_id, act) == ((200, 150), (300, 250))


async def test_write_and_press_type_into_the_focused_window(sandbox_id, tmp_path):
    typed = tmp_path / "typed"

    def act(desktop):
        terminal = desktop.commands.run(f"xterm -e sh -c 'cat > {typed}'", background=True)
        windows = desktop.commands.run("xdotool search --sync --onlyvisible --class xterm").stdout.split()
        desktop.commands.run(f"xdotool windowactivate --sync {windows[-1]}")
        desktop.write("hello desktop", chunk_size=5, delay_in_ms=10)
        desktop.press("enter")
        desktop.press(["ctrl", "d"])
        terminal.wait()

    await in_thread(sandbox_id, act)
    assert typed.read_text() == "hello desktop\n"
