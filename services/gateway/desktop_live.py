"""Live view of a sandbox's desktop in a browser: CreateDesktopStream's tokens, the noVNC page, and the WebSocket that
carries VNC (RFB) from the guest's x11vnc through the relay's port forward.

- A token is the auth service's: scoped to `desktop-view` or `desktop-control` and to one sandbox's cluster id, short
  lived, never good for the API. Each WebSocket checks it; a refusal (expired, another sandbox, malformed) is
  audited under the method `DesktopLiveView`.
- View-only connects to the session's view-only x11vnc (its port + 1, started with -viewonly): the viewer's input is
  dropped in the guest whatever its client sends. Control connects to the shared one. Several viewers at once.
- The page is our own few lines around noVNC's RFB module (Debian's `novnc` files, `gateway.novnc_dir`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
from pathlib import Path

import grpc
import structlog
from aiohttp import WSMsgType, web

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import desktop_service_pb2 as api
from microvm.sandbox.v1 import desktop_service_pb2_grpc, port_forward_service_pb2, port_forward_service_pb2_grpc
from microvm.types.v1 import auth_pb2 as auth_types
from services.common import deadlines
from services.common.errors import InvalidArgument, PermissionDenied, ServiceError
from services.gateway.access import current_principal
from services.gateway.data_plane import DataPlane

log = structlog.get_logger()
SCOPES = ("desktop-view", "desktop-control")
DEFAULT_TTL_SECONDS = 600
MAX_TTL_SECONDS = 3600
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>html,body{{margin:0;height:100%;background:#222;color:#ddd;font:14px sans-serif}}
#status{{position:fixed;top:0;right:0;padding:4px 8px;background:#0008}}#screen{{height:100%}}</style></head>
<body><div id="status">connecting</div><div id="screen"></div>
<script type="module">
import RFB from "../novnc/core/rfb.js";
const status = document.getElementById("status");
const url = new URL("websocket" + location.search, location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
const rfb = new RFB(document.getElementById("screen"), url.href, {{shared: true}});
rfb.viewOnly = {view_only};
rfb.scaleViewport = true;
rfb.addEventListener("connect", () => {{ status.textContent = "{mode}"; document.title = "connected: {title}"; }});
rfb.addEventListener("disconnect", (e) => {{ status.textContent = e.detail.clean ? "closed" : "disconnected"; }});
window.rfb = rfb;
</script></body></html>
"""


class DesktopLive:
    def __init__(self, context, data: DataPlane, http_address: str) -> None:
        """`http_address`: where the HTTP/JSON door is bound, for links when no `public_http_url` is set."""
        self.context, self.data = context, data
        settings = context.settings
        self.base = (settings.public_http_url or f"http://{http_address}").rstrip("/")
        self.novnc = Path(settings.novnc_dir)

    async def _on_auth(self, invoke):
        return await self.context.on_newest(
            "auth", None, auth_pb2_grpc.AuthServiceStub, invoke, retry_for=deadlines.RESTART_WAIT
        )

    async def create(self, request: api.CreateDesktopStreamRequest) -> api.CreateDesktopStreamResponse:
        ttl = request.ttl.seconds if request.HasField("ttl") else DEFAULT_TTL_SECONDS
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument(f"ttl must be 1-{MAX_TTL_SECONDS} s, got {ttl}", reason="INVALID_REQUEST")
        record = await self.data.sandboxes.running(request.sandbox)
        principal = current_principal() or auth_pb2.Principal(id="anonymous", role=auth_types.ROLE_ADMIN)
        if not request.view_only and principal.role == auth_types.ROLE_VIEWER:
            raise PermissionDenied("a viewer may watch a desktop (view_only), not control it", reason="VIEW_ONLY")
        scope = "desktop-view" if request.view_only else "desktop-control"
        issue = auth_pb2.IssueScopedTokenRequest(principal=principal, scope=scope, resource=record.id, ttl_seconds=ttl)
        issued = await self._on_auth(lambda auth: auth.IssueScopedToken(issue, timeout=deadlines.QUICK))
        page = f"{self.base}/desktop/{record.id}/?token={issued.token}"
        socket = f"{self.base.replace('http', 'ws', 1)}/desktop/{record.id}/websocket?token={issued.token}"
        return api.CreateDesktopStreamResponse(
            url=page, websocket_url=socket, token=issued.token, expire_time=issued.expire_time
        )

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/desktop/novnc/{path:.+}", self.novnc_file)
        app.router.add_get("/desktop/{sandbox}/", self.page)
        app.router.add_get("/desktop/{sandbox}/websocket", self.websocket)

    async def novnc_file(self, request: web.Request) -> web.StreamResponse:
        path = (self.novnc / request.match_info["path"]).resolve()
        if not path.is_relative_to(self.novnc.resolve()) or not path.is_file():
            return web.json_response({"code": 5, "message": "no such noVNC file"}, status=404)
        return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    async def page(self, request: web.Request) -> web.StreamResponse:
        scope, failure = await self._admit(request)
        if failure is not None:
            return failure
        sandbox = html.escape(request.match_info["sandbox"])
        view_only = scope == "desktop-view"
        body = PAGE.format(
            title=f"{sandbox} desktop", view_only=json.dumps(view_only), mode="watching" if view_only else "control"
        )
        return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _admit(self, request: web.Request) -> tuple[str, web.Response | None]:
        """The token's scope, or the refusal to answer (audited)."""
        sandbox, token = request.match_info["sandbox"], request.query.get("token", "")
        check = auth_pb2.CheckScopedTokenRequest(token=token, scopes=SCOPES, resource=sandbox)
        try:
            checked = await self._on_auth(lambda auth: auth.CheckScopedToken(check, timeout=deadlines.QUICK))
            return checked.scope, None
        except (grpc.aio.AioRpcError, ServiceError) as error:
            code = error.code() if isinstance(error, grpc.aio.AioRpcError) else error.code
            said = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            await self._audit_refusal(sandbox, code)
            status = 403 if code == grpc.StatusCode.PERMISSION_DENIED else 401
            return "", web.json_response({"code": code.value[0], "message": said}, status=status)

    async def _audit_refusal(self, sandbox: str, code: grpc.StatusCode) -> None:
        """In the audit log of the sandbox's tenant (who would want to know); a sandbox that does not exist has none."""
        try:
            tenant = (await self.data.sandboxes.store.get_by_id(sandbox)).message.tenant
        except ServiceError:
            log.info("desktop_live_view_refused", target=sandbox, result=code.name)
            return
        event = auth_pb2.RecordAuditEventRequest(
            event=auth_types.AuditEvent(
                tenant=tenant, principal="desktop-live-view", method="DesktopLiveView", target=sandbox, result=code.name
            )
        )
        try:
            await self._on_auth(lambda auth: auth.RecordAuditEvent(event, timeout=deadlines.QUICK))
        except (grpc.aio.AioRpcError, ServiceError) as error:
            log.warning("audit_record_failed", method="DesktopLiveView", target=sandbox, error=str(error))

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        scope, failure = await self._admit(request)
        if failure is not None:
            return failure
        sandbox = request.match_info["sandbox"]
        record = (await self.data.sandboxes.store.get_by_id(sandbox)).message
        relay = self.data.nodes.relay_channel(record.node)
        described = await desktop_service_pb2_grpc.DesktopServiceStub(relay).GetDesktop(
            api.GetDesktopRequest(sandbox=f"sandboxes/{record.id}"), timeout=deadlines.QUICK
        )
        port = described.vnc_view_port if scope == "desktop-view" else described.vnc_port
        if not port:
            return web.json_response({"code": 9, "message": "this desktop serves no VNC"}, status=412)
        # compress=False: aiohttp would otherwise accept the permessage-deflate every browser offers and deflate each
        # VNC message, data that noVNC's encodings (Tight, ZRLE: zlib and JPEG) have compressed already (a ZRLE frame
        # of a 1024x768 desktop deflated alone came out 0.1% larger): CPU in the gateway and the browser for nothing.
        socket = web.WebSocketResponse(protocols=("binary",), max_msg_size=16 << 20, compress=False)
        await socket.prepare(request)
        await self._pump(socket, relay, record.id, port)
        return socket

    async def _pump(self, socket: web.WebSocketResponse, relay, sandbox_id: str, port: int) -> None:
        """WebSocket binary messages <-> one ForwardPort call to the guest's VNC port, until either side ends."""
        first = port_forward_service_pb2.ForwardPortRequest(
            target=port_forward_service_pb2.PortTarget(sandbox=f"sandboxes/{sandbox_id}", port=port)
        )
        outgoing: asyncio.Queue = asyncio.Queue(maxsize=64)

        async def requests():
            yield first
            while (message := await outgoing.get()) is not None:
                yield message

        call = port_forward_service_pb2_grpc.PortForwardServiceStub(relay).ForwardPort(requests())

        async def from_browser() -> None:
            async for message in socket:
                if message.type == WSMsgType.BINARY:
                    await outgoing.put(port_forward_service_pb2.ForwardPortRequest(data=message.data))
                elif message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
            await outgoing.put(None)

        upstream = asyncio.ensure_future(from_browser())
        try:
            async for event in call:
                if event.data:
                    await socket.send_bytes(event.data)
        except grpc.aio.AioRpcError as error:
            log.info("desktop_live_view_ended", sandbox=sandbox_id, code=error.code().name, message=error.details())
        finally:
            upstream.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upstream
            await socket.close()
