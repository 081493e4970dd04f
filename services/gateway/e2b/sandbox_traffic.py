"""The E2B in-sandbox traffic door (`E2B_SANDBOX_URL`, default 127.0.0.1:3001).

Each request names its sandbox and port by the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers (the SDK's explicit
URL form) or by its Host, `<port>-<sandbox id>.<domain>` (E2B's domain form behind a reverse proxy, deploy/e2b/).
Its credential is the sandbox's access token (`X-Access-Token` or `E2B-Traffic-Access-Token`, access_token.py) or
one of our API keys (`X-API-Key`). The door checks either against the gateway's own gRPC API (GetSandbox with that
credential: the tenant wall and the token's confinement are the API's), answers E2B's error shapes for what it
refuses (no or a bad credential 401, an unknown sandbox, another tenant's, or one the token is not for 404), and
hands the rest, as a SandboxCall, to the handler of the port: envd.py (49983), code_interpreter.py (49999),
guest_http.py (any other).
A yes is kept for CHECK_SECONDS, so a burst of requests costs one check; every call a handler makes is checked by
the API again in any case, so a kept yes never lets anything through that the API would refuse.
"""

from __future__ import annotations

import importlib
import time

import grpc
import structlog
from aiohttp import web

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.gateway.e2b import access_token, guest_http, shapes
from services.gateway.e2b.sandbox_call import SandboxCall

log = structlog.get_logger()
ENVD_PORT, CODE_INTERPRETER_PORT = 49983, 49999
# The handler module of each port served by a translation (imported when first used: they may be absent).
PORT_HANDLERS = {ENVD_PORT: "services.gateway.e2b.envd", CODE_INTERPRETER_PORT: "services.gateway.e2b.code_interpreter"}
CHECK_SECONDS = 30.0
CHECKS_KEPT = 10000


def target(request: web.Request) -> tuple[str, int]:
    """The sandbox id and port a request is for (E2bError 400 when it names neither or a bad port)."""
    sandbox, port = request.headers.get("E2b-Sandbox-Id", ""), request.headers.get("E2b-Sandbox-Port", "")
    if not sandbox and not port:
        # `<port>-<sandbox id>.<domain>`: the first label of the Host (without its own :port).
        label = request.host.rsplit(":", 1)[0].split(".", 1)[0] if "." in request.host else ""
        port, _, sandbox = label.partition("-")
    if not sandbox or not port:
        raise shapes.E2bError(
            400, "name the sandbox: E2b-Sandbox-Id and E2b-Sandbox-Port headers, or Host <port>-<sandbox id>.<domain>"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise shapes.E2bError(400, f"the sandbox port must be 1-65535, not {port!r}")
    return sandbox, int(port)


class SandboxTraffic:
    def __init__(self, loopback, require_auth: bool = True) -> None:
        self.loopback = loopback  # .channel: the gateway's own gRPC server
        self.require_auth = require_auth
        self._checked: dict[tuple[str, str], float] = {}  # (sandbox, credential) -> kept until

    def app(self) -> web.Application:
        # Uploads through /files stream (envd.py reads the body as it comes); forwarded bodies are read whole.
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    def _credential(self, request: web.Request, sandbox: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        # E2B-Traffic-Access-Token: the same token, as the code interpreter SDK sends it on some calls.
        token = (request.headers.get("X-Access-Token") or request.headers.get("E2B-Traffic-Access-Token") or "").strip()
        key = request.headers.get("X-API-Key", "").strip()
        if token:
            scoped = access_token.sandbox_scope(token)
            if scoped is None:
                raise shapes.E2bError(401, "X-Access-Token is not a sandbox access token")
            if scoped != sandbox:
                raise shapes.E2bError(404, f"sandbox {sandbox} not found")
            return token, (("authorization", f"Bearer {token}"),)
        if key:
            return key, (("authorization", f"Bearer {key}"),)
        if not self.require_auth:
            return "", ()
        raise shapes.E2bError(401, "send the sandbox's access token (X-Access-Token) or an API key (X-API-Key)")

    async def _check(self, sandbox: str, credential: str, metadata) -> None:
        """The credential reaches the sandbox: GetSandbox with it answers (its refusal, in E2B's shape, when not)."""
        if self._checked.get((sandbox, credential), 0.0) > time.monotonic():
            return
        stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.loopback.channel)
        try:
            await stub.GetSandbox(api.GetSandboxRequest(name=f"sandboxes/{sandbox}"), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise shapes.E2bError(404, f"sandbox {sandbox} not found") from None
            raise
        if len(self._checked) >= CHECKS_KEPT:
            self._checked.clear()  # rare; the next requests check again
        self._checked[(sandbox, credential)] = time.monotonic() + CHECK_SECONDS

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            sandbox, port = target(request)
            credential, metadata = self._credential(request, sandbox)
            await self._check(sandbox, credential, metadata)
            call = SandboxCall(sandbox=sandbox, port=port, metadata=metadata, channel=self.loopback.channel)
            if port not in PORT_HANDLERS:
                return await guest_http.handle(request, call)
            handler = _handler(PORT_HANDLERS[port])
            if handler is None:
                return shapes.error_response(501, f"port {port} of a sandbox is not implemented yet by this backend")
            return await handler(request, call)
        except shapes.E2bError as error:
            return shapes.error_response(error.status, error.message)
        except grpc.aio.AioRpcError as error:
            return shapes.grpc_error_response(error)


def _handler(module_name: str):
    """The `handle` of a port's module, None while that module does not exist yet."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None
    return getattr(module, "handle", None)
