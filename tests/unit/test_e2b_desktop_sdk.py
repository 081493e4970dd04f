"""The unmodified e2b-desktop SDK (2.7.2) through the gateway's E2B doors: its input and screenshot calls are shell
commands (xdotool, scrot) run through envd's commands.run. Here they run on this host's private Xvfb display with
openbox (`desktop_installation`: the fake VMM runs a sandbox's processes on the host), so this proves the calls' path
through our doors, not the desktop template's contents (it lacks scrot, for one).

e2b-desktop's own `Sandbox.create()` is not used: after starting Xvfb it waits for an XFCE session (xfce4-session,
xfwm4, xfdesktop), which neither our template nor this host runs. `Sandbox.connect()` to a sandbox made with the
display in its environment is what an agent can use instead. Its `stream` is the VNC server and noVNC it would start,
reached through the door's WebSocket forward."""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import aiohttp
import pytest
from e2b import AsyncSandbox
from e2b_desktop import Sandbox as DesktopSandbox

from tests.etcd import free_port
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


NOVNC = Path("/usr/share/novnc")  # Debian's noVNC; the e2b-desktop template has it where the SDK looks, /opt/noVNC


@pytest.mark.skipif(
    shutil.which("x11vnc") is None or not (NOVNC / "utils" / "novnc_proxy").exists(), reason="needs x11vnc and novnc"
)
async def test_the_stream_serves_novnc_and_its_vnc_websocket_through_the_door(doors, sandbox_id, desktop_installation):
    """desktop.stream.start() runs x11vnc on the display and noVNC's proxy (websockify, also serving noVNC's page) on
    port 6080; get_url() is that port's vnc.html. Here the page and the RFB stream of its WebSocket cross the door.

    The SDK's start itself cannot run on this host: it refuses when `pgrep -x x11vnc` finds one and stops with `pkill
    x11vnc`, which here see every x11vnc on the host (this module's display runs two), and it runs noVNC from
    /opt/noVNC. So its two commands run as it words them but on free loopback ports, in the foreground (killed at the
    end, not left behind) and with Debian's noVNC; tests/standing/test_e2b_desktop_guest.py runs its own start."""
    vnc_port, web_port = free_port(), free_port()
    display = desktop_installation.display_env["DISPLAY"]
    desktop = await asyncio.to_thread(DesktopSandbox.connect, sandbox_id)
    started = []
    for command in (
        f"x11vnc -display {display} -forever -wait 50 -shared -rfbport {vnc_port} -nopw -localhost",
        f"cd {NOVNC}/utils && ./novnc_proxy --vnc localhost:{vnc_port} --listen 127.0.0.1:{web_port} --web {NOVNC}",
    ):
        started.append(await asyncio.to_thread(desktop.commands.run, command, background=True, timeout=0))
    headers = {
        "E2b-Sandbox-Id": sandbox_id,
        "E2b-Sandbox-Port": str(web_port),
        "X-Access-Token": desktop.connection_config.sandbox_headers["X-Access-Token"],
    }
    try:
        while True:  # 502 until noVNC listens
            async with doors.http.get(doors.sandbox + "/vnc.html?autoconnect=true", headers=headers) as page:
                if page.status == 200:
                    assert "<title>noVNC</title>" in await page.text()
                    break
                assert page.status == 502
            await asyncio.sleep(0.1)
        while True:  # websockify closes the WebSocket while x11vnc does not listen yet
            url = doors.sandbox + "/websockify"
            async with doors.http.ws_connect(url, headers=headers, protocols=("binary",)) as socket:
                message = await socket.receive()
            if message.type == aiohttp.WSMsgType.BINARY:
                break
            await asyncio.sleep(0.1)
        assert message.data.startswith(b"RFB 003.00")  # the VNC server's greeting, through noVNC's proxy and the door
    finally:
        for handle in started:
            await asyncio.to_thread(handle.kill)  # its whole process group: novnc_proxy's websockify too
