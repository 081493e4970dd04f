"""DesktopService end to end (gateway -> relay -> agent tunnel -> the desktop server's socket) against an in-process
installation whose `desktop` sandboxes reach a real desktop server on a private Xvfb display of this host."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import desktop_service_pb2 as api
from microvm.sandbox.v1 import desktop_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def caller(desktop_installation):
    caller = await tenant_caller(desktop_installation, f"desk-{desktop_installation.node}")
    caller.desktop = desktop_service_pb2_grpc.DesktopServiceStub(caller.channel)
    request = sandbox_api.CreateSandboxRequest(sandbox=dict(template="desktop"))
    caller.sandbox = (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox.name
    return caller


async def call(caller, method: str, request):
    return await getattr(caller.desktop, method)(request, metadata=caller.metadata, timeout=60)


async def act(caller, **action):
    return await call(caller, "DesktopAction", api.DesktopActionRequest(sandbox=caller.sandbox, **action))


async def test_a_screenshot_is_a_png_of_the_screen_and_of_a_scaled_region(caller):
    whole = await call(caller, "Screenshot", api.ScreenshotRequest(sandbox=caller.sandbox))
    assert whole.png.startswith(b"\x89PNG\r\n\x1a\n") and (whole.width, whole.height) == (1024, 768)
    part = await call(
        caller,
        "Screenshot",
        api.ScreenshotRequest(sandbox=caller.sandbox, region=api.Region(x=10, y=20, width=200, height=100), scale=0.5),
    )
    assert (part.width, part.height) == (100, 50)


async def test_moving_the_cursor_is_seen_by_the_desktop(caller, desktop_installation):
    await act(caller, move=api.MoveAction(to=api.Point(x=321, y=234)))
    described = await call(caller, "GetDesktop", api.GetDesktopRequest(sandbox=caller.sandbox))
    assert (described.cursor.x, described.cursor.y) == (321, 234) and (described.width, described.height) == (1024, 768)
    located = subprocess.run(
        ["xdotool", "getmouselocation"], env=desktop_installation.display_env, capture_output=True, text=True
    )
    assert located.stdout.startswith("x:321 y:234")


async def test_a_launched_window_is_listed_focused_and_closed_and_the_screen_changes(caller):
    launched = await act(caller, launch=api.LaunchAction(app="xterm", args=["-title", "mvm-e2e"]))
    assert launched.pid > 0
    waited = await call(
        caller,
        "WaitForScreen",
        api.WaitForScreenRequest(sandbox=caller.sandbox, timeout=duration_pb2.Duration(seconds=30)),
    )
    assert waited.outcome == api.SCREEN_WAIT_OUTCOME_CHANGED
    window = None
    for _ in range(100):
        described = await call(caller, "GetDesktop", api.GetDesktopRequest(sandbox=caller.sandbox))
        window = next((w for w in described.windows if w.title == "mvm-e2e"), None)
        if window:
            break
    assert window is not None and window.geometry.width > 0
    await act(caller, focus_window=api.WindowAction(id=window.id))
    await act(caller, type=api.TypeAction(text="exit"))
    await act(caller, press=api.PressAction(keys=["Return"]))
    stable = await call(
        caller,
        "WaitForScreen",
        api.WaitForScreenRequest(
            sandbox=caller.sandbox, until=api.SCREEN_WAIT_STABLE, timeout=duration_pb2.Duration(seconds=30)
        ),
    )
    assert stable.outcome == api.SCREEN_WAIT_OUTCOME_STABLE


async def test_refusals_of_the_guest_become_statuses(caller):
    with pytest.raises(grpc.aio.AioRpcError) as unknown_key:
        await act(caller, press=api.PressAction(keys=["ctrl+nosuchkey"]))
    assert unknown_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuchkey" in unknown_key.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as off_screen:
        await act(caller, click=api.ClickAction(at=api.Point(x=5000, y=10)))
    assert off_screen.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await act(caller, close_window=api.WindowAction(id="0x7fffffff"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_recording_ends_as_a_file(caller):
    started = await call(caller, "StartRecording", api.StartRecordingRequest(sandbox=caller.sandbox, fps=5))
    assert started.path.endswith(".webm")
    await act(caller, move=api.MoveAction(to=api.Point(x=50, y=50)))
    stopped = await call(caller, "StopRecording", api.StopRecordingRequest(sandbox=caller.sandbox))
    assert stopped.path == started.path and stopped.size_bytes > 0
