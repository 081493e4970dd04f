"""A stand-in for the E2B front door (services/gateway/e2b/sandbox_traffic.py) in tests of the code interpreter: an
aiohttp app on a loopback port that hands port-49999 requests to code_interpreter.handle for the sandbox the
`E2b-Sandbox-Id` header names, with one caller's credential."""

from __future__ import annotations

import contextlib

from aiohttp import web

from services.gateway.e2b.code_interpreter import handle
from services.gateway.e2b.sandbox_call import SandboxCall


@contextlib.asynccontextmanager
async def code_front_door(caller):
    """Yields the URL to give the SDK as E2B_SANDBOX_URL."""

    async def front_door(request: web.Request) -> web.StreamResponse:
        port = int(request.headers["E2b-Sandbox-Port"])
        call = SandboxCall(
            sandbox=request.headers["E2b-Sandbox-Id"], port=port, metadata=caller.metadata, channel=caller.channel
        )
        return await handle(request, call)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front_door)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()
