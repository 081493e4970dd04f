"""`make bench` / `make bench-desktop` (issue 17): the desktop on the running installation (`make up`, then `make
templates` builds `desktop`). Raw gRPC through the installation's gateway on 127.0.0.1 (as bench/code.py), each
figure beside a baseline from the same run:

- desktop_first_screenshot_after_create: CreateSandbox(desktop) + a full Screenshot until its PNG, vs
  CreateSandbox(desktop) + Exec(echo) until the first output byte, alternating (warm creates: the pool refills
  between them).
- desktop_screenshot_p50: a full-size PNG Screenshot (1024x768, a terminal open) in a ready sandbox, vs Exec(`true`)
  in the same sandbox, alternating.
- desktop_click_to_change_p50: a right click on the empty desktop (openbox opens its root menu there) until a
  screenshot of the region under the click differs from the one taken before; Escape and the region's return
  between clicks. Baseline: that region's screenshot round trip (the polling's resolution).
- desktop_vnc_fps_<encoding>: full frames per second (bench/rfb.py: FramebufferUpdateRequest incremental=0 for the
  whole screen, one in flight, `raw` and `zrle`) from x11vnc through the gateway's WebSocket (the live view's path:
  gateway, relay, agent channel), vs the same client run inside the guest against x11vnc on its loopback (no
  transport at all: x11vnc's own rate in this guest); `..._port_forward` rows compare with the SDK's port forward
  (the same relay path without the WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import aiohttp
from google.protobuf import duration_pb2

from bench import installation as running
from bench import rfb
from bench.run import emit
from microvm.sandbox.v1 import desktop_service_pb2 as desk
from microvm.sandbox.v1 import desktop_service_pb2_grpc
from microvm_sandbox import AsyncClient, AsyncSandbox

TEMPLATE = os.environ.get("MVM_BENCH_DESKTOP_TEMPLATE", "desktop")
CREATES = int(os.environ.get("MVM_BENCH_DESKTOP_CREATES", "5"))
CALLS = int(os.environ.get("MVM_BENCH_DESKTOP_CALLS", "30"))
CLICKS = int(os.environ.get("MVM_BENCH_DESKTOP_CLICKS", "15"))
FPS_SECONDS = float(os.environ.get("MVM_BENCH_DESKTOP_FPS_SECONDS", "5"))
MENU_AT = (800, 80)  # right of the centred terminal: openbox's root menu opens down and right of the click
MENU_REGION = desk.Region(x=MENU_AT[0], y=MENU_AT[1], width=100, height=100)
METRICS = ("desktop_first_screenshot_after_create", "desktop_screenshot_p50", "desktop_click_to_change_p50")


def row(metric: str, value: float, unit: str, baseline: float, baseline_metric: str, goal: str = "", note: str = ""):
    """bench.run's row, with a note saying how it was measured."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        emit(metric, value, unit, baseline, baseline_metric, goal)
    print(json.dumps({**json.loads(out.getvalue()), "note": note}), flush=True)


class Installation(running.Installation):
    def __init__(self) -> None:
        super().__init__(TEMPLATE)
        self.desktop = desktop_service_pb2_grpc.DesktopServiceStub(self.channel)

    def screenshot(self, name: str, region: desk.Region | None = None) -> tuple[float, bytes]:
        started = time.perf_counter()
        shot = self.desktop.Screenshot(
            desk.ScreenshotRequest(sandbox=name, region=region), metadata=self.metadata, timeout=120
        )
        return time.perf_counter() - started, shot.png

    def act(self, name: str, **action) -> desk.DesktopActionResponse:
        request = desk.DesktopActionRequest(sandbox=name, **action)
        return self.desktop.DesktopAction(request, metadata=self.metadata, timeout=120)

    def settle(self, name: str) -> None:
        request = desk.WaitForScreenRequest(
            sandbox=name, until=desk.SCREEN_WAIT_STABLE, timeout=duration_pb2.Duration(seconds=60)
        )
        self.desktop.WaitForScreen(request, metadata=self.metadata, timeout=120)


def first_calls(installation: Installation) -> tuple[list[float], list[float]]:
    shots, execs = [], []
    for _ in range(CREATES):
        for runs in (shots, execs):
            started = time.perf_counter()
            name = installation.create()
            if runs is shots:
                installation.screenshot(name)
            else:
                installation.exec(name, ["echo", "hello"])
            runs.append(time.perf_counter() - started)
            installation.delete(name)
            time.sleep(5)  # the pool refills between creates, as for every warm create figure
    return shots, execs


def click_latencies(installation: Installation, name: str) -> tuple[list[float], list[float]]:
    """Right click -> the region under it first differs; and every region screenshot's round trip (the polls)."""
    latencies, polls = [], []
    x, y = MENU_AT
    for _ in range(CLICKS):
        _, before = installation.screenshot(name, MENU_REGION)
        started = time.perf_counter()
        installation.act(name, click=desk.ClickAction(at=desk.Point(x=x, y=y), button=desk.MOUSE_BUTTON_RIGHT))
        while True:
            took, now = installation.screenshot(name, MENU_REGION)
            polls.append(took)
            if now != before:
                break
        latencies.append(time.perf_counter() - started)
        installation.act(name, press=desk.PressAction(keys=["Escape"]))
        for _ in range(200):  # the menu gone again (it may need a few polls)
            if installation.screenshot(name, MENU_REGION)[1] == before:
                break
    return latencies, polls


class WebSocketStream:
    """bench.rfb's stream over the live view's WebSocket (binary messages carry the VNC bytes as they come)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket, self.buffer = socket, bytearray()

    async def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            message = await self.socket.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"the live view's WebSocket ended: {message.type.name} {message.data!r}")
            self.buffer += message.data
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def write(self, data: bytes) -> None:
        await self.socket.send_bytes(data)


async def vnc_rates(installation: Installation, name: str, encoding: str) -> dict[str, dict]:
    """Frames per second over the WebSocket, the SDK's port forward, and inside the guest on its loopback."""
    live = installation.desktop.CreateDesktopStream(
        desk.CreateDesktopStreamRequest(sandbox=name, view_only=False), metadata=installation.metadata, timeout=60
    )
    port = installation.desktop.GetDesktop(
        desk.GetDesktopRequest(sandbox=name), metadata=installation.metadata, timeout=60
    ).vnc_port
    rates = {}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(live.websocket_url, protocols=("binary",), max_msg_size=0) as socket:
            rates["websocket"] = await rfb.frames_per_second(WebSocketStream(socket), FPS_SECONDS, encoding)
    client = AsyncClient(running.GATEWAY)
    try:
        sandbox = await AsyncSandbox.connect(name, client)
        async with sandbox.forward_port(port) as forward:
            rates["port_forward"] = await rfb.over_tcp("127.0.0.1", forward.local_port, FPS_SECONDS, encoding)
        await sandbox.write("/tmp/mvm_bench_rfb.py", Path(rfb.__file__).read_bytes())
        argv = ["python3", "/tmp/mvm_bench_rfb.py", "127.0.0.1", str(port), str(FPS_SECONDS), encoding]
        ran = await sandbox.exec(argv, timeout=FPS_SECONDS + 120)
        if ran.exit_code != 0:
            raise SystemExit(f"bench desktop: the in-guest VNC client failed: {ran.stderr.decode()[-2000:]}")
        rates["in_guest"] = json.loads(ran.stdout)
    finally:
        await client.close()
    return rates


def fps(rate: dict) -> float:
    return rate["frames"] / rate["seconds"]


def throughput(rate: dict) -> str:
    per_second = rate["bytes"] / rate["seconds"]
    return f"{per_second / (1 << 20):.1f} MiB/s" if per_second >= 1 << 20 else f"{per_second / 1024:.1f} KiB/s"


def emit_vnc(encoding: str, rates: dict[str, dict]) -> None:
    websocket, forward, guest = rates["websocket"], rates["port_forward"], rates["in_guest"]
    size = f"{websocket['width']}x{websocket['height']}"
    how = (
        f"bench/rfb.py: FramebufferUpdateRequest incremental=0 for the whole {size} screen, one in flight, "
        f"{encoding} encoding, {FPS_SECONDS:g} s each"
    )
    row(
        f"desktop_vnc_fps_{encoding}",
        fps(websocket),
        "fps",
        fps(guest),
        f"desktop_vnc_fps_{encoding}_in_guest_loopback",
        note=f"{how}; value: through the gateway's WebSocket ({throughput(websocket)}); baseline: the same client "
        f"inside the guest on 127.0.0.1 to the same x11vnc ({throughput(guest)}): x11vnc's own rate there, "
        "though that client shares the guest's vCPUs with x11vnc",
    )
    row(
        f"desktop_vnc_fps_{encoding}_vs_port_forward",
        fps(websocket),
        "fps",
        fps(forward),
        f"desktop_vnc_fps_{encoding}_port_forward",
        note=f"{how}; baseline: the SDK's forward_port to the same x11vnc ({throughput(forward)}): the same "
        "relay path as the WebSocket, carried by gRPC end to end",
    )


def unavailable() -> str:
    return running.unavailable(TEMPLATE)


def main() -> None:
    why = unavailable()
    if why:
        for metric in (*METRICS, "desktop_vnc_fps_zrle", "desktop_vnc_fps_raw"):
            print(json.dumps({"metric": metric, "value": None, "note": why}), flush=True)
        return
    installation = Installation()
    shots, execs = first_calls(installation)
    row(
        METRICS[0],
        statistics.median(shots),
        "s",
        statistics.median(execs),
        "first_exec_after_create",
        note=f"median of {CREATES} warm creates each, alternating; a full-size PNG vs the first byte of echo",
    )
    name = installation.create()
    try:
        installation.screenshot(name)
        latencies, polls = click_latencies(installation, name)
        row(
            METRICS[2],
            statistics.median(latencies) * 1000,
            "ms",
            statistics.median(polls) * 1000,
            "desktop_region_screenshot_p50",
            note=f"{CLICKS} right clicks at {MENU_AT} on the empty desktop (openbox's root menu opens): from sending "
            "the click until a 100x100 screenshot there first differs from before it; the baseline is one such "
            "screenshot's round trip, so the figure is at most one of those late",
        )
        installation.act(name, launch=desk.LaunchAction(app="terminal"))
        installation.settle(name)
        shot_times, exec_times = [], []
        for _ in range(CALLS):
            shot_times.append(installation.screenshot(name)[0])
            exec_times.append(installation.exec(name, ["true"])[1])
        row(
            METRICS[1],
            statistics.median(shot_times) * 1000,
            "ms",
            statistics.median(exec_times) * 1000,
            "exec_true_p50",
            note=f"{CALLS} full 1024x768 PNG screenshots (a terminal open) and Exec(true), alternating",
        )
        for encoding in ("zrle", "raw"):
            emit_vnc(encoding, asyncio.run(vnc_rates(installation, name, encoding)))
    finally:
        installation.delete(name)


if __name__ == "__main__":
    main()
