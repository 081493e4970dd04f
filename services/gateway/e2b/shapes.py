"""E2B's JSON shapes (../shared/reference/e2b/openapi.yml, as the e2b SDK's models read them) made from ours.

- Errors are `{"code": <HTTP status>, "message": "..."}`; a gRPC failure keeps its message and takes the standard
  gRPC-to-HTTP status (the HTTP/JSON door's mapping, http_files.HTTP_STATUS).
- A sandbox is answered in the three forms the SDK parses: `Sandbox` (create, connect, resume), `SandboxDetail`
  (get) and `ListedSandbox` (list). `sandboxID` is our id (`sandboxes/{id}` without the prefix), `templateID` our
  template's name, `alias` the E2B name it was asked by, `metadata` our labels.
- E2B's well-known template names are aliases of our built-ins; any other name is one of our templates.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from microvm.sandbox.v1 import sandbox_pb2
from services.gateway.http_files import HTTP_STATUS

# The envd version the SDK is told: the newest it gates a feature on (e2b/envd/versions.py, 0.6.4 watches network
# mounts), so it uses every feature, each served by envd.py, and none it would refuse for an old envd.
ENVD_VERSION = "0.6.4"
CLIENT_ID = "microvm"
# E2B's `desktop` is the one its desktop SDK expects: no session at start (the SDK starts Xvfb and XFCE itself), which
# our `e2b-desktop` template is; our own `desktop` (openbox, its session running) serves DesktopService.
TEMPLATE_ALIASES = {"base": "default", "code-interpreter-v1": "code-interpreter", "desktop": "e2b-desktop"}
E2B_NAMES = {ours: e2b for e2b, ours in TEMPLATE_ALIASES.items()}
PREFIX = "sandboxes/"


class E2bError(Exception):
    """A refusal answered in E2B's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def grpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    return error_response(HTTP_STATUS.get(error.code().name, 500), error.details() or error.code().name.lower())


def our_template(template_id: str) -> str:
    """E2B's `templateID` (`name` or `name:tag`) as our template reference: the same tag, E2B's well-known names
    as our built-ins' (our TemplateService checks the name and the tag)."""
    name, colon, tag = template_id.partition(":")
    return TEMPLATE_ALIASES.get(name, name) + colon + tag


# --- values of a request -------------------------------------------------------------------------------------
def seconds(value, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise E2bError(400, f"{name} must be a whole number of seconds")
    try:
        seconds = int(value)
    except ValueError:
        raise E2bError(400, f"{name} must be a whole number of seconds") from None
    if seconds < least:
        raise E2bError(400, f"{name} must be at least {least}")
    return seconds


def strings(value, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise E2bError(400, f"{name} must be an object of strings")
    return value


def sandbox_id(sandbox: sandbox_pb2.Sandbox) -> str:
    return sandbox.name.removeprefix(PREFIX)


def state(sandbox: sandbox_pb2.Sandbox) -> str:
    """E2B knows two states: paused, and running (ours being created, running, or on a node that stopped
    answering)."""
    return "paused" if sandbox.state == sandbox_pb2.SANDBOX_STATE_PAUSED else "running"


def _common(sandbox: sandbox_pb2.Sandbox) -> dict:
    found = {
        "templateID": sandbox.template,
        "sandboxID": sandbox_id(sandbox),
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
    }
    if sandbox.template in E2B_NAMES:
        found["alias"] = E2B_NAMES[sandbox.template]
    return found


def _times_and_size(sandbox: sandbox_pb2.Sandbox) -> dict:
    return {
        "startedAt": sandbox.create_time.ToDatetime().isoformat() + "Z",
        "endAt": sandbox.expire_time.ToDatetime().isoformat() + "Z",
        "cpuCount": sandbox.vcpus,
        "memoryMB": sandbox.memory_mib,
        "diskSizeMB": 0,  # not part of our Sandbox (the template's root filesystem decides it)
        "state": state(sandbox),
        "metadata": dict(sandbox.labels),
    }


def created(sandbox: sandbox_pb2.Sandbox, access_token: str | None, domain: str) -> dict:
    """`Sandbox`: what create, connect and resume answer. The access token is both the envd one (sent as
    X-Access-Token) and the traffic one (sent as E2B-Traffic-Access-Token by the code interpreter SDK on the calls
    where it sends no X-Access-Token): one credential for every port of the sandbox."""
    found = {**_common(sandbox), "domain": domain or None}
    if access_token:
        found.update(envdAccessToken=access_token, trafficAccessToken=access_token)
    return found


def detail(sandbox: sandbox_pb2.Sandbox, domain: str) -> dict:
    """`SandboxDetail`: what get answers."""
    return {**_common(sandbox), **_times_and_size(sandbox), "domain": domain or None}


def listed(sandbox: sandbox_pb2.Sandbox) -> dict:
    """`ListedSandbox`: one item of a list."""
    return {**_common(sandbox), **_times_and_size(sandbox)}


def metric(sample) -> dict:
    """`SandboxMetric` from one of our ResourceSamples."""
    seconds = sample.time.ToSeconds()
    return {
        "timestamp": sample.time.ToDatetime().isoformat() + "Z",
        "timestampUnix": seconds,
        "cpuCount": sample.vcpus,
        "cpuUsedPct": sample.cpu_percent,
        "memUsed": sample.guest_memory_used_bytes or sample.memory_bytes,
        "memTotal": sample.guest_memory_total_bytes or sample.memory_limit_bytes,
        "memCache": 0,
        "diskUsed": sample.disk_bytes,
        "diskTotal": 0,
    }
