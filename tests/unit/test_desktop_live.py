"""Desktop live view: CreateDesktopStream's scoped tokens, the noVNC page and the WebSocket carrying VNC from the
desktop's x11vnc (a real one, on this host's private Xvfb display) through the relay's port forward."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import desktop_service_pb2 as api
from microvm.sandbox.v1 import desktop_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from microvm.types.v1 import auth_pb2 as auth_types
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def caller(desktop_installation):
    if not desktop_installation.display_env or not await vnc_served(desktop_installation):
        pytest.skip("x11vnc is not installed on this host (make apt)")
    return desktop_installation.caller


async def vnc_served(node) -> bool:
    caller = await tenant_caller(node, f"live-{node.node}")
    caller.desktop = desktop_service_pb2_grpc.DesktopServiceStub(caller.channel)
    request = sandbox_api.CreateSandboxRequest(sandbox=dict(template="desktop"))
    caller.sandbox = (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox.name
    node.caller = caller
    described = await caller.desktop.GetDesktop(api.GetDesktopRequest(sandbox=caller.sandbox), metadata=caller.metadata)
    assert described.vnc_view_port in (0, described.vnc_port + 1)
    return described.vnc_port > 0


async def stream(caller, **fields) -> api.CreateDesktopStreamResponse:
    request = api.CreateDesktopStreamRequest(sandbox=caller.sandbox, **fields)
    return await caller.desktop.CreateDesktopStream(request, metadata=caller.metadata, timeout=30)


async def rfb_banner(websocket_url: str) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(websocket_url, protocols=("binary",)) as socket:
            message = await asyncio.wait_for(socket.receive(), 30)
            return message.data


@pytest.mark.parametrize("view_only", [True, False])
async def test_a_token_opens_the_page_and_the_vnc_websocket(caller, desktop_installation, view_only):
    opened = await stream(caller, view_only=view_only)
    assert opened.url.startswith(desktop_installation.http) and opened.token in opened.url
    async with aiohttp.ClientSession() as http:
        async with http.get(opened.url) as page:
            assert page.status == 200 and "core/rfb.js" in await page.text()
            assert f"rfb.viewOnly = {'true' if view_only else 'false'}" in await page.text()
        async with http.get(f"{desktop_installation.http}/desktop/novnc/core/rfb.js") as module:
            assert module.status == 200 and "export default class RFB" in await module.text()
    assert (await rfb_banner(opened.websocket_url)).startswith(b"RFB 003.")


async def test_the_websocket_declines_compression_vnc_is_compressed_already(caller):
    opened = await stream(caller, view_only=True)
    async with aiohttp.ClientSession() as http:
        # compress=15 offers permessage-deflate, as every browser does
        async with http.ws_connect(opened.websocket_url, protocols=("binary",), compress=15) as socket:
            assert socket.compress == 0
            assert (await asyncio.wait_for(socket.receive(), 30)).data.startswith(b"RFB 003.")


async def test_two_viewers_watch_at_once(caller):
    opened = await stream(caller, view_only=True)
    banners = await asyncio.gather(rfb_banner(opened.websocket_url), rfb_banner(opened.websocket_url))
    assert all(banner.startswith(b"RFB 003.") for banner in banners)


async def test_refused_tokens_are_refused_and_audited(caller, desktop_installation):
    opened = await stream(caller, view_only=True)
    base = opened.websocket_url.split("?")[0]
    async with aiohttp.ClientSession() as http:
        for url, status in (
            (base + "?token=not-a-token", 401),
            (base.replace(caller.sandbox.split("/")[1], "sbx-someone-else") + f"?token={opened.token}", 403),
        ):
            async with http.get(url) as refused:
                assert refused.status in (status, 401, 403), await refused.text()
    short = await stream(caller, view_only=True, ttl=duration_pb2.Duration(seconds=1))
    await asyncio.sleep(2.1)  # past its expiry
    async with aiohttp.ClientSession() as http:
        async with http.get(short.url) as expired:
            assert expired.status == 401 and "expired" in await expired.text()
    auth = auth_pb2_grpc.AuthServiceStub(desktop_installation.channel(await desktop_installation.address("auth")))
    tenant = f"live-{desktop_installation.node}"
    events = (await auth.ListAuditEvents(auth_pb2.ListAuditEventsRequest(tenant=tenant), timeout=10)).events
    refusals = [e for e in events if e.method == "DesktopLiveView"]
    assert {e.result for e in refusals} >= {"UNAUTHENTICATED"}


async def test_a_desktop_token_is_no_api_key(caller):
    opened = await stream(caller, view_only=False)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await caller.stub.GetSandbox(
            sandbox_api.GetSandboxRequest(name=caller.sandbox), metadata=(("authorization", f"Bearer {opened.token}"),)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_viewer_may_watch_but_not_take_control(caller, desktop_installation):
    viewer = await tenant_caller(desktop_installation, f"live-{desktop_installation.node}", role=auth_types.ROLE_VIEWER)
    stub = desktop_service_pb2_grpc.DesktopServiceStub(viewer.channel)
    watched = await stub.CreateDesktopStream(
        api.CreateDesktopStreamRequest(sandbox=caller.sandbox, view_only=True), metadata=viewer.metadata
    )
    assert watched.token
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.CreateDesktopStream(api.CreateDesktopStreamRequest(sandbox=caller.sandbox), metadata=viewer.metadata)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
