"""DesktopService's bounds and refusals through the whole path (gateway -> relay), against an in-process installation
whose sandboxes have no display: every bad request is refused before it reaches a guest, and a good one on a sandbox
without the desktop server says what is missing."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import desktop_service_pb2 as api
from microvm.sandbox.v1 import desktop_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from microvm.types.v1 import auth_pb2 as auth_types
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def caller(installation):
    caller = await tenant_caller(installation, f"desktop-{installation.node}")
    caller.desktop = desktop_service_pb2_grpc.DesktopServiceStub(caller.channel)
    reply = await caller.stub.CreateSandbox(sandbox_api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    caller.sandbox = reply.sandbox.name
    return caller


async def refused(caller, method: str, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await getattr(caller.desktop, method)(request, metadata=caller.metadata, timeout=20)
    return failure.value


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"move": api.MoveAction(to=api.Point(x=-1, y=5))}, "off any screen"),
        ({"click": api.ClickAction(at=api.Point(x=1 << 16, y=0))}, "off any screen"),
        ({"scroll": api.ScrollAction(amount=101)}, "amount"),
        ({"type": api.TypeAction(text="")}, "type.text"),
        ({"type": api.TypeAction(text="x" * 10_001)}, "type.text"),
        ({"press": api.PressAction(keys=[])}, "press.keys"),
        ({"launch": api.LaunchAction(app="")}, "launch.app"),
        ({"focus_window": api.WindowAction(id="")}, "focus_window.id"),
        ({}, "no action"),
    ],
)
async def test_bad_actions_are_invalid_arguments(caller, fields, says):
    error = await refused(caller, "DesktopAction", api.DesktopActionRequest(sandbox=caller.sandbox, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.details()


async def test_bad_screenshots_waits_and_recordings_are_invalid_arguments(caller):
    name = caller.sandbox
    for method, request in (
        ("Screenshot", api.ScreenshotRequest(sandbox=name, scale=1.5)),
        ("Screenshot", api.ScreenshotRequest(sandbox=name, region=api.Region(width=0, height=4))),
        ("WaitForScreen", api.WaitForScreenRequest(sandbox=name, timeout=duration_pb2.Duration(seconds=301))),
        ("StartRecording", api.StartRecordingRequest(sandbox=name, fps=31)),
        ("StartRecording", api.StartRecordingRequest(sandbox=name, path="/tmp/x.avi")),
    ):
        assert (await refused(caller, method, request)).code() == grpc.StatusCode.INVALID_ARGUMENT, method


async def test_a_sandbox_without_a_display_says_so(caller):
    error = await refused(caller, "Screenshot", api.ScreenshotRequest(sandbox=caller.sandbox))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "desktop" in error.details()


async def test_a_viewer_may_look_but_not_act(installation, caller):
    viewer = await tenant_caller(installation, f"desktop-{installation.node}", role=auth_types.ROLE_VIEWER)
    stub = desktop_service_pb2_grpc.DesktopServiceStub(viewer.channel)
    with pytest.raises(grpc.aio.AioRpcError) as looked:
        await stub.Screenshot(api.ScreenshotRequest(sandbox=caller.sandbox), metadata=viewer.metadata)
    assert looked.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # allowed; this sandbox has no display
    action = api.DesktopActionRequest(sandbox=caller.sandbox, type=api.TypeAction(text="x"))
    with pytest.raises(grpc.aio.AioRpcError) as acted:
        await stub.DesktopAction(action, metadata=viewer.metadata)
    assert acted.value.code() == grpc.StatusCode.PERMISSION_DENIED
