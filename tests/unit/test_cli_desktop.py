"""`mvm desktop`: its parsing, then the commands as processes of their own against an in-process installation whose
`desktop` sandboxes reach a real desktop server on a private Xvfb display of this host."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import aiohttp
import pytest

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from mvm_cli.main import parse
from tests.inprocess import tenant_caller
from tests.unit.test_cli_code import mvm
from tests.unit.test_sdk_desktop import share_tmp

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_desktop_actions_parse_with_their_options():
    shot = parse(["desktop", "sbx-1", "screenshot", "-o", "s.png", "--region", "1,2,30,40", "--scale", "0.5"])
    assert (shot.id, shot.action, shot.output, shot.region, shot.scale) == (
        "sbx-1",
        "screenshot",
        "s.png",
        (1, 2, 30, 40),
        0.5,
    )
    click = parse(["desktop", "sbx-1", "click", "10", "20", "--button", "right"])
    assert (click.x, click.y, click.button, click.double) == (10, 20, "right", False)
    launch = parse(["desktop", "sbx-1", "launch", "chromium", "--incognito", "https://example.com"])
    assert (launch.app, launch.args) == ("chromium", ["--incognito", "https://example.com"])
    assert parse(["desktop", "sbx-1", "press", "ctrl+l", "Return"]).keys == ["ctrl+l", "Return"]
    assert parse(["desktop", "sbx-1", "scroll", "up"]).amount == 1
    for bad in (["screenshot", "--region", "1,2"], ["screenshot", "--scale", "2"], ["scroll", "sideways"], []):
        with pytest.raises(SystemExit):
            parse(["desktop", "sbx-1", *bad])


@pytest.fixture(scope="module")
async def sandbox(desktop_installation):
    caller = await tenant_caller(desktop_installation, f"clidesk-{desktop_installation.node}")
    gateway = await desktop_installation.address("gateway")
    client = AsyncClient(gateway, caller.key)
    sandbox = await AsyncSandbox.create("desktop", client=client)
    sandbox.gateway, sandbox.key = gateway, caller.key
    share_tmp(desktop_installation, sandbox)
    yield sandbox
    await sandbox.kill()
    await client.close()


async def test_screenshot_writes_a_png_of_the_screen_or_of_a_scaled_region(sandbox, tmp_path):
    status, out, err = await mvm(sandbox, "desktop", sandbox.id, "screenshot", "-o", str(tmp_path / "s.png"))
    assert (status, out, err) == (0, f"{tmp_path / 's.png'}\n", "")
    png = (tmp_path / "s.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and struct.unpack(">II", png[16:24]) == (1024, 768)
    status, _, _ = await mvm(
        sandbox,
        "desktop",
        sandbox.id,
        "screenshot",
        "-o",
        "part.png",
        "--region",
        "0,0,200,100",
        "--scale",
        "0.5",
        cwd=str(tmp_path),
    )
    assert status == 0 and struct.unpack(">II", (tmp_path / "part.png").read_bytes()[16:24]) == (100, 50)


async def test_launch_windows_type_press_and_close_act_on_the_desktop(sandbox):
    status, out, _ = await mvm(sandbox, "desktop", sandbox.id, "launch", "xterm", "-title", "cli-desktop")
    assert status == 0 and int(out) > 0
    window = None
    for _ in range(100):
        _, out, _ = await mvm(sandbox, "desktop", sandbox.id, "windows", "--json")
        window = next((w for w in json.loads(out) if w["title"] == "cli-desktop"), None)
        if window:
            break
    assert window is not None
    _, table, _ = await mvm(sandbox, "desktop", sandbox.id, "windows")
    assert table.startswith("WINDOW") and "cli-desktop" in table
    assert (await mvm(sandbox, "desktop", sandbox.id, "focus", window["id"]))[0] == 0
    status, out, _ = await mvm(sandbox, "desktop", sandbox.id, "move", str(window["x"] + 5), str(window["y"] + 5))
    assert (status, out) == (0, "")
    assert (await sandbox.desktop.cursor_position()) == (window["x"] + 5, window["y"] + 5)
    assert (await mvm(sandbox, "desktop", sandbox.id, "type", "echo from-the-cli"))[0] == 0
    assert (await mvm(sandbox, "desktop", sandbox.id, "press", "Return"))[0] == 0
    status, out, _ = await mvm(sandbox, "desktop", sandbox.id, "wait", "--stable", "--timeout", "20")
    assert (status, out) == (0, "stable\n")
    assert (await mvm(sandbox, "desktop", sandbox.id, "close", window["id"]))[0] == 0
    status, _, err = await mvm(sandbox, "desktop", sandbox.id, "press", "ctrl+frobnicate")
    assert status == 1 and "frobnicate" in err and err.startswith("mvm: INVALID_ARGUMENT")


async def test_record_start_then_stop_downloads_the_file(sandbox, tmp_path):
    status, out, _ = await mvm(sandbox, "desktop", sandbox.id, "record", "start", "--path", "/tmp/cli-recording.webm")
    assert (status, out) == (0, "/tmp/cli-recording.webm\n")
    await sandbox.desktop.move(10, 10)
    await sandbox.desktop.move(200, 200)
    status, out, _ = await mvm(sandbox, "desktop", sandbox.id, "record", "stop", "-o", str(tmp_path / "r.webm"))
    assert status == 0 and out.startswith(f"{tmp_path / 'r.webm'} (")
    assert (tmp_path / "r.webm").stat().st_size > 0
    (tmp_path / "r.webm").unlink()
    Path("/tmp/cli-recording.webm").unlink()  # the host's /tmp (share_tmp)


async def test_url_prints_a_live_view_link_whose_page_answers(sandbox, desktop_installation):
    status, out, err = await mvm(sandbox, "desktop", sandbox.id, "url", "--control", "--ttl", "60")
    assert status == 0, err
    link = out.strip()
    assert link.startswith(f"{desktop_installation.http}/desktop/") and "token=" in link
    async with aiohttp.ClientSession() as http, http.get(link) as page:
        assert page.status == 200 and "rfb.viewOnly = false" in await page.text()
