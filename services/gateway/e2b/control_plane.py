"""The E2B REST control plane (`E2B_API_URL`, default 127.0.0.1:3000), translated onto our SandboxService.

Each request is a call on the gateway's own gRPC server over loopback with the caller's credential: `X-API-Key:
<our API key>` becomes `authorization: Bearer <it>`, so authentication, the tenant wall (another tenant's sandbox is
404, as a missing one), quotas and audit are the gRPC API's. The routes are those the e2b SDK calls (`app`): sandboxes
here, fork and snapshots in snapshot_routes.py, the Template builder in template_builds.py, template listing,
deletion and tags in template_routes.py, logs in console_logs.py;
every other E2B feature answers 501 with its name (`UNSUPPORTED`), any other path 404, and a failure of ours 500, all
in E2B's error shape. Create, connect and resume also answer a fresh per-sandbox access token (access_token.py).
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.parse

import grpc
import structlog
from aiohttp import web
from google.protobuf import field_mask_pb2

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import metrics_service_pb2, metrics_service_pb2_grpc, sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common import deadlines
from services.gateway.e2b import access_token, console_logs, shapes, template_routes
from services.gateway.e2b.shapes import PREFIX, E2bError
from services.gateway.e2b.snapshot_routes import SnapshotRoutes, is_snapshot
from services.gateway.e2b.template_builds import TemplateBuilds

log = structlog.get_logger()
# The first path segment of E2B features this backend does not serve, and the name the 501 gives them.
UNSUPPORTED = {
    "templates": "template updates and build listing (building, listing, deleting and tagging are served)",
    "builds": "template updates and build listing (building, listing, deleting and tagging are served)",
    "volumes": "volumes",
    "secrets": "secrets",
    "teams": "teams",
    "api-keys": "API key management (use `mvm keys`)",
    "access-tokens": "access token management",
    "nodes": "node administration (use `mvm nodes`)",
}
SANDBOX_UNSUPPORTED = {"network": "network updates"}
# Fields of a create that have no translation: refused by name when set, never ignored.
CREATE_UNSUPPORTED = {
    "mcp": "MCP servers",
    "network": "network rules",
    "iam": "workload identity (iam)",
    "volumeMounts": "volumes",
}
E2B_DEFAULT_TIMEOUT = 15  # seconds, the API's default when a create names none (the SDK always sends one)


class ControlPlane:
    def __init__(self, loopback, settings, authenticate) -> None:
        self.loopback = loopback  # .channel: the gateway's own gRPC server
        self.settings = settings
        self.authenticate = authenticate  # async (api_key) -> auth Principal; None when auth is off
        self.snapshots = SnapshotRoutes(self)
        self.templates = TemplateBuilds(self)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        for verb, path, handler in (
            ("POST", "/sandboxes", self.create),
            ("POST", "/v2/sandboxes", self.create),
            ("GET", "/sandboxes", self.list_running),
            ("GET", "/v2/sandboxes", self.list_page),
            ("GET", "/sandboxes/{id}", self.get),
            ("DELETE", "/sandboxes/{id}", self.kill),
            ("POST", "/sandboxes/{id}/timeout", self.set_timeout),
            ("POST", "/sandboxes/{id}/refreshes", self.refresh),
            ("POST", "/sandboxes/{id}/pause", self.pause),
            ("POST", "/sandboxes/{id}/resume", self.resume),
            ("POST", "/sandboxes/{id}/connect", self.connect),
            ("POST", "/v2/sandboxes/{id}/connect", self.connect),
            ("GET", "/sandboxes/{id}/metrics", self.metrics),
            ("GET", "/sandboxes/{id}/logs", self.logs),
            ("GET", "/v2/sandboxes/{id}/logs", self.logs_v2),
        ):
            app.router.add_route(verb, path, handler)
        self.snapshots.add(app)
        template_routes.add(self, app)
        self.templates.add(app)
        app.router.add_route("*", "/{tail:.*}", self.unsupported)
        return app

    # --- plumbing -----------------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except E2bError as error:
            return shapes.error_response(error.status, error.message)
        except grpc.aio.AioRpcError as error:
            return shapes.grpc_error_response(error)
        except web.HTTPException as error:  # aiohttp's own (413 for a body over the limit)
            return shapes.error_response(error.status, error.reason)
        except Exception as error:  # a bug of ours: still E2B's shape, and in the log
            log.exception("e2b_control_plane_failed", path=request.path)
            return shapes.error_response(500, f"internal error: {type(error).__name__}")

    def metadata(self, request: web.Request) -> tuple[tuple[str, str], ...]:
        key = request.headers.get("X-API-Key", "").strip()
        if not key and self.settings.require_auth:
            raise E2bError(401, "send your API key in the X-API-Key header")
        return (("authorization", f"Bearer {key}"),) if key else ()

    def stub(self) -> sandbox_service_pb2_grpc.SandboxServiceStub:
        return sandbox_service_pb2_grpc.SandboxServiceStub(self.loopback.channel)

    async def body(self, request: web.Request) -> dict:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise E2bError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise E2bError(400, "the request body must be a JSON object")
        return body

    async def _sandbox(self, request: web.Request, metadata) -> sandbox_pb2.Sandbox:
        name = PREFIX + request.match_info["id"]
        reply = await self.stub().GetSandbox(api.GetSandboxRequest(name=name), metadata=metadata, timeout=30)
        return reply.sandbox

    async def with_token(self, sandbox: sandbox_pb2.Sandbox, metadata, status: int) -> web.Response:
        token = await self.issue(metadata, shapes.sandbox_id(sandbox))
        return web.json_response(shapes.created(sandbox, token, self.settings.e2b_domain), status=status)

    async def issue(self, metadata, sandbox: str) -> str | None:
        """A fresh access token for `sandbox`, for the principal of the caller's API key (access_token.py)."""
        principal = await self.authenticate(dict(metadata).get("authorization", "")[len("Bearer ") :])
        if principal is None:
            return None
        return await access_token.issue(self.loopback.context, principal, sandbox)

    async def _extend(self, sandbox: sandbox_pb2.Sandbox, seconds: int, metadata) -> sandbox_pb2.Sandbox:
        """Moves the sandbox's end to `seconds` from now unless it already ends later (E2B's refresh and connect)."""
        if sandbox.expire_time.ToSeconds() >= time.time() + seconds:
            return sandbox
        return await self.set_timeout_of(sandbox.name, seconds, metadata)

    async def set_timeout_of(self, name: str, seconds: int, metadata) -> sandbox_pb2.Sandbox:
        update = api.UpdateSandboxRequest(
            sandbox=sandbox_pb2.Sandbox(name=name), update_mask=field_mask_pb2.FieldMask(paths=["timeout"])
        )
        update.sandbox.timeout.FromSeconds(seconds)
        return (await self.stub().UpdateSandbox(update, metadata=metadata, timeout=30)).sandbox

    # --- routes -------------------------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        metadata = self.metadata(request)
        body = await self.body(request)
        template = body.get("templateID")
        if not isinstance(template, str) or not template:
            raise E2bError(400, "templateID is required")
        for field, feature in CREATE_UNSUPPORTED.items():
            if body.get(field):
                raise E2bError(501, f"{feature} are not supported by this backend")
        resume = body.get("autoResume")  # {"enabled": bool} when the SDK's lifecycle names it
        if body.get("autoPause") or (resume.get("enabled") if isinstance(resume, dict) else resume):
            raise E2bError(501, "auto-pause and auto-resume are not supported by this backend")
        timeout = shapes.seconds(body.get("timeout", E2B_DEFAULT_TIMEOUT), "timeout")
        if is_snapshot(template):
            return await self.snapshots.restore(body, metadata, timeout)
        sandbox = sandbox_pb2.Sandbox(
            template=shapes.our_template(template),
            labels=shapes.strings(body.get("metadata"), "metadata"),
            env=shapes.strings(body.get("envVars"), "envVars"),
        )
        sandbox.timeout.FromSeconds(timeout)
        if (internet := body.get("allow_internet_access")) is not None:
            sandbox.network_policy.egress = sandbox_pb2.EGRESS_MODE_FULL if internet else sandbox_pb2.EGRESS_MODE_NONE
        reply = await self.stub().CreateSandbox(
            api.CreateSandboxRequest(sandbox=sandbox), metadata=metadata, timeout=deadlines.PUBLIC_CALL
        )
        return await self.with_token(reply.sandbox, metadata, 201)

    async def list_page(self, request: web.Request) -> web.Response:
        """v2: one page; `state` (comma-separated) and `metadata` (URL-encoded `k=v&...`) filters."""
        metadata = self.metadata(request)
        states = {s for s in request.query.get("state", "running,paused").split(",") if s}
        if not states <= {"running", "paused"}:
            raise E2bError(400, f"state must be running or paused, not {','.join(sorted(states))}")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise E2bError(400, "limit must be a number") from None
        if not 1 <= limit <= 1000:
            raise E2bError(400, "limit must be between 1 and 1000")
        reply = await self.stub().ListSandboxes(
            api.ListSandboxesRequest(
                page_size=limit, page_token=request.query.get("nextToken", ""), filter=_filter(request.query)
            ),
            metadata=metadata,
            timeout=30,
        )
        template = shapes.our_template(request.query["template"]) if request.query.get("template") else ""
        after = _microseconds(request.query["startedAfter"]) if request.query.get("startedAfter") else 0
        sandboxes = [
            shapes.listed(s)
            for s in reply.sandboxes
            if shapes.state(s) in states
            and (not template or s.template == template)
            and s.create_time.ToMicroseconds() >= after
        ]
        headers = {"x-next-token": reply.next_page_token} if reply.next_page_token else {}
        return web.json_response(sandboxes, headers=headers)

    async def list_running(self, request: web.Request) -> web.Response:
        """v1: every running sandbox, no pagination."""
        metadata = self.metadata(request)
        found, token = [], ""
        while True:
            reply = await self.stub().ListSandboxes(
                api.ListSandboxesRequest(page_size=1000, page_token=token, filter=_filter(request.query)),
                metadata=metadata,
                timeout=30,
            )
            found += [shapes.listed(s) for s in reply.sandboxes if shapes.state(s) == "running"]
            if not (token := reply.next_page_token):
                return web.json_response(found)

    async def get(self, request: web.Request) -> web.Response:
        sandbox = await self._sandbox(request, self.metadata(request))
        return web.json_response(shapes.detail(sandbox, self.settings.e2b_domain))

    async def kill(self, request: web.Request) -> web.Response:
        name = PREFIX + request.match_info["id"]
        await self.stub().DeleteSandbox(
            api.DeleteSandboxRequest(name=name), metadata=self.metadata(request), timeout=120
        )
        return web.Response(status=204)

    async def set_timeout(self, request: web.Request) -> web.Response:
        metadata = self.metadata(request)
        body = await self.body(request)
        if "timeout" not in body:
            raise E2bError(400, "timeout is required")
        await self.set_timeout_of(
            PREFIX + request.match_info["id"], shapes.seconds(body["timeout"], "timeout"), metadata
        )
        return web.Response(status=204)

    async def refresh(self, request: web.Request) -> web.Response:
        metadata = self.metadata(request)
        seconds = shapes.seconds((await self.body(request)).get("duration", E2B_DEFAULT_TIMEOUT), "duration")
        await self._extend(await self._sandbox(request, metadata), seconds, metadata)
        return web.Response(status=204)

    async def pause(self, request: web.Request) -> web.Response:
        metadata = self.metadata(request)
        sandbox = await self._sandbox(request, metadata)
        if sandbox.state == sandbox_pb2.SANDBOX_STATE_PAUSED:
            raise E2bError(409, f"sandbox {shapes.sandbox_id(sandbox)} is already paused")
        await self.stub().PauseSandbox(api.PauseSandboxRequest(name=sandbox.name), metadata=metadata, timeout=120)
        return web.Response(status=204)

    async def resume(self, request: web.Request) -> web.Response:
        """The deprecated resume: only a paused sandbox (409 otherwise)."""
        metadata = self.metadata(request)
        body = await self.body(request)
        sandbox = await self._sandbox(request, metadata)
        if sandbox.state != sandbox_pb2.SANDBOX_STATE_PAUSED:
            raise E2bError(409, f"sandbox {shapes.sandbox_id(sandbox)} is not paused")
        return await self._connect(sandbox, body, metadata)

    async def connect(self, request: web.Request) -> web.Response:
        """Resumes a paused sandbox (201) or connects to a running one (200); either way extends its timeout."""
        metadata = self.metadata(request)
        body = await self.body(request)
        return await self._connect(await self._sandbox(request, metadata), body, metadata)

    async def _connect(self, sandbox: sandbox_pb2.Sandbox, body: dict, metadata) -> web.Response:
        status = 200
        if sandbox.state == sandbox_pb2.SANDBOX_STATE_PAUSED:
            reply = await self.stub().ResumeSandbox(
                api.ResumeSandboxRequest(name=sandbox.name), metadata=metadata, timeout=120
            )
            sandbox, status = reply.sandbox, 201
        if "timeout" in body:
            sandbox = await self._extend(sandbox, shapes.seconds(body["timeout"], "timeout"), metadata)
        return await self.with_token(sandbox, metadata, status)

    async def metrics(self, request: web.Request) -> web.Response:
        metadata = self.metadata(request)
        query = metrics_service_pb2.GetSandboxMetricsRequest(sandbox=PREFIX + request.match_info["id"])
        for key, field in (("start", query.start_time), ("end", query.end_time)):
            if key in request.query:
                field.FromSeconds(shapes.seconds(request.query[key], key, least=0))
        stub = metrics_service_pb2_grpc.SandboxMetricsServiceStub(self.loopback.channel)
        samples = []
        async for batch in stub.GetSandboxMetrics(query, metadata=metadata, timeout=30):
            samples += [shapes.metric(sample) for sample in batch.samples]
        return web.json_response(samples)

    async def logs(self, request: web.Request) -> web.Response:
        return await console_logs.logs(self, request, v2=False)

    async def logs_v2(self, request: web.Request) -> web.Response:
        return await console_logs.logs(self, request, v2=True)

    async def unsupported(self, request: web.Request) -> web.Response:
        self.metadata(request)  # 401 before anything else, as every route
        parts = [p for p in request.path.split("/") if p]
        if parts and parts[0] in ("v2", "v3"):
            parts = parts[1:]
        if len(parts) >= 3 and parts[0] == "sandboxes" and parts[2] in SANDBOX_UNSUPPORTED:
            raise E2bError(501, f"sandbox {SANDBOX_UNSUPPORTED[parts[2]]}: not supported by this backend yet")
        if parts and parts[0] in UNSUPPORTED:
            raise E2bError(501, f"{UNSUPPORTED[parts[0]]}: not supported by this backend")
        raise E2bError(404, f"no route for {request.method} {request.path}")


def _microseconds(text: str) -> int:
    """An ISO 8601 time (the SDK's `startedAfter`) as microseconds since the epoch (exact, as our timestamps); naive
    is UTC."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise E2bError(400, f"startedAfter is not an ISO 8601 time: {text!r}") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
    return (moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)) // datetime.timedelta(microseconds=1)


def _filter(query) -> str:
    """E2B's `metadata` query (`k=v&k2=v2`, URL-encoded once more by the SDK) as our label filter."""
    terms = []
    for key, value in urllib.parse.parse_qsl(query.get("metadata", ""), keep_blank_values=True):
        if " " in key or " " in value:
            raise E2bError(400, "metadata filters cannot hold spaces")
        terms.append(f"labels.{key}={value}")
    return " ".join(terms)


async def authenticate(context, api_key: str) -> auth_pb2.Principal:
    """The principal of an API key, asked of auth (a create or connect: once per sandbox, not per request)."""
    request = auth_pb2.AuthenticateRequest(credential=api_key)
    reply = await context.on_newest(
        "auth",
        None,
        auth_pb2_grpc.AuthServiceStub,
        lambda auth: auth.Authenticate(request, timeout=deadlines.QUICK),
        retry_for=deadlines.RESTART_WAIT,
    )
    return reply.principal
