"""The per-sandbox access token the E2B SDKs send on in-sandbox requests: the create's `envdAccessToken`, sent as
`X-Access-Token`, and the same value as its `trafficAccessToken`, which e2b-code-interpreter sends as
`E2B-Traffic-Access-Token` where it sends no X-Access-Token (its /contexts calls).

The choice: it is an auth-service scoped token (services/auth/credentials.py: an Ed25519-signed JWS), scope
`e2b-sandbox`, resource the sandbox's id, carrying the principal of the API key that created or connected to the
sandbox. It is stateless (any gateway replica checks it), dies with the API key it was bought with (auth checks the
key on every verification, and a cached yes is dropped as soon as the gateway's copy of the key records shows it
revoked), and it is good for that one sandbox only:

- The in-sandbox handlers call our gRPC API with it (`SandboxCall.metadata` is `authorization: Bearer <it>`), and the
  gateway's door (services/gateway/access.py) admits it only for the in-sandbox methods in IN_SANDBOX_METHODS and
  only when the call's target is its sandbox; any other target is NOT_FOUND, as another tenant's sandbox is. So the
  confinement is the API's own, not a promise of the handlers.
- Its lifetime is TOKEN_TTL_SECONDS (24 h, the gateway's default longest sandbox timeout), so it outlives the
  sandbox in any usual E2B use; every create, connect and resume issues a fresh one.
- Checking it costs a round trip to auth once per token per gateway: VerifiedTokens keeps a verified token's
  principal until its expiry (bounded in size), so the per-request path is a dict lookup.
"""

from __future__ import annotations

import base64
import json
import time

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common import deadlines

SCOPE = "e2b-sandbox"
TOKEN_TTL_SECONDS = 86400
CACHE_SIZE = 10000

# What a token of SCOPE may call, always on its own sandbox: the data plane, code, ports, desktop and metrics. The
# lifecycle (create, delete, update, pause, fork, snapshots, lists) stays with API keys.
IN_SANDBOX_METHODS = frozenset(
    [
        *(
            f"/microvm.sandbox.v1.SandboxService/{name}"
            for name in (
                "GetSandbox",
                "Exec",
                "ExecInteractive",
                "WriteFile",
                "ReadFile",
                "ListDir",
                "Stat",
                "MakeDir",
                "Remove",
                "Rename",
                "UploadArchive",
                "DownloadArchive",
                "WatchDir",
                "ReadConsoleLog",
                "StartProcess",
                "ListProcesses",
                "ConnectProcess",
                "SendProcessInput",
                "SignalProcess",
            )
        ),
        *(
            f"/microvm.sandbox.v1.CodeService/{name}"
            for name in (
                "RunCode",
                "CreateCodeContext",
                "ListCodeContexts",
                "RestartCodeContext",
                "DeleteCodeContext",
                "InterruptCode",
            )
        ),
        "/microvm.sandbox.v1.PortForwardService/ForwardPort",
        *(
            f"/microvm.sandbox.v1.DesktopService/{name}"
            for name in (
                "Screenshot",
                "GetDesktop",
                "DesktopAction",
                "WaitForScreen",
                "StartRecording",
                "StopRecording",
                "CreateDesktopStream",
            )
        ),
        "/microvm.sandbox.v1.SandboxMetricsService/GetSandboxMetrics",
    ]
)


async def issue(context, principal: auth_pb2.Principal, sandbox: str) -> str:
    """A fresh access token of `principal` for `sandbox` (auth signs it)."""
    request = auth_pb2.IssueScopedTokenRequest(
        principal=principal, scope=SCOPE, resource=sandbox, ttl_seconds=TOKEN_TTL_SECONDS
    )
    reply = await context.on_newest(
        "auth",
        None,
        auth_pb2_grpc.AuthServiceStub,
        lambda auth: auth.IssueScopedToken(request, timeout=deadlines.QUICK),
        retry_for=deadlines.RESTART_WAIT,
    )
    return reply.token


def claims(token: str) -> dict | None:
    """The token's claims, unverified (to learn its scope and resource before asking auth); None when it is not a
    JWS at all."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def sandbox_scope(token: str) -> str | None:
    """The sandbox id a token of SCOPE is for (unverified), None for any other credential."""
    payload = claims(token)
    if payload is None or payload.get("scope") != SCOPE or not isinstance(payload.get("res"), str):
        return None
    return payload["res"]


def sandbox_of_target(target: str) -> str:
    """`sandboxes/abc` (or `sandboxes/abc/...`, or `abc`) -> `abc`: the sandbox a call's target names."""
    parts = target.split("/")
    return parts[1] if len(parts) > 1 and parts[0] == "sandboxes" else target


class VerifiedTokens:
    """Scoped tokens auth has verified, each kept until its expiry: principal and sandbox id by token."""

    def __init__(self, local_keys=None) -> None:
        self.local_keys = local_keys  # LocalApiKeys: a revoked key drops its tokens' cached yes at once
        self._verified: dict[str, tuple[auth_pb2.Principal, str, float]] = {}

    def get(self, token: str) -> tuple[auth_pb2.Principal, str] | None:
        entry = self._verified.get(token)
        if entry is None:
            return None
        principal, sandbox, expires = entry
        if expires <= time.time() or self._revoked(principal.key_id):
            del self._verified[token]
            return None
        return principal, sandbox

    def put(self, token: str, principal: auth_pb2.Principal, sandbox: str) -> None:
        expires = claims(token).get("exp", 0)
        if len(self._verified) >= CACHE_SIZE:  # the oldest entry goes (dicts keep insertion order)
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, sandbox, float(expires))

    def _revoked(self, key_id: str) -> bool:
        if self.local_keys is None or not self.local_keys.live:
            return False
        record = self.local_keys.keys.get(key_id)
        return record is None or record.revoked
