"""envd (services/gateway/e2b/envd.py) served on its own for tests: a small aiohttp app on 127.0.0.1 that hands
every request to `envd.handle` with a SandboxCall for one sandbox of a real in-process installation, and the
unmodified E2B SDK's AsyncSandbox pointed at it (E2B_SANDBOX_URL's form: every in-sandbox call to that URL)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from aiohttp import web
from packaging.version import Version

from services.gateway.e2b.envd import handle
from services.gateway.e2b.sandbox_call import SandboxCall

# The envd version the SDK is told (what the control plane reports): features up to 0.6.4 (watch entry info,
# octet-stream uploads, close stdin).
ENVD_VERSION = Version("0.6.4")
# The SDK runs every command as `/bin/bash -l -c`. The fake VMM's guest is a host process, so a login shell reads
# the host's ~/.profile, where a pyenv init may rehash under a lock file: a test that kills such a shell mid-profile
# (a timeout, a kill) would leave the lock behind and make every later login shell on the host wait 60 s for it.
# Test sandboxes get a HOME with no profile (our guests' own shells are not the host's).
SANDBOX_ENV = {"HOME": "/tmp"}


@asynccontextmanager
async def envd_app(caller, sandbox_id: str):
    """Yields the URL of an envd for `sandbox_id` as `caller` (a tests.inprocess.Caller) sees it."""
    call = SandboxCall(sandbox=sandbox_id, port=49983, metadata=caller.metadata, channel=caller.channel)

    async def serve(request: web.Request) -> web.StreamResponse:
        return await handle(request, call)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", serve)
    runner = web.AppRunner(app, handler_cancellation=True)  # a caller that leaves ends its stream at once
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def e2b_sandbox(url: str, sandbox_id: str):
    """The E2B SDK's AsyncSandbox for an existing sandbox whose envd is at `url` (no control plane involved)."""
    from e2b import AsyncSandbox
    from e2b.connection_config import ConnectionConfig

    config = ConnectionConfig(sandbox_url=url, api_key="e2b_" + "0" * 40, request_timeout=30)
    return AsyncSandbox(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=ENVD_VERSION,
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=config,
    )
