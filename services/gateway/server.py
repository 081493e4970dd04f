"""Wiring of the gateway: the public SandboxService and the expiry reaper."""

from __future__ import annotations

import asyncio

from aiohttp import web

from microvm.sandbox.v1 import sandbox_service_pb2, sandbox_service_pb2_grpc
from services.common.config import parse_address
from services.common.server import ServiceContext
from services.common.settings import GatewaySettings
from services.gateway.access import AccessInterceptor
from services.gateway.http import HttpGateway
from services.gateway.sandboxes import SandboxServicer


def interceptors(context: ServiceContext[GatewaySettings]) -> list:
    settings = context.settings
    return (
        [AccessInterceptor(context, settings.rate_limit_per_second, settings.rate_limit_burst)]
        if settings.require_auth
        else []
    )


async def wire(server, context: ServiceContext[GatewaySettings]) -> list[str]:
    servicer = SandboxServicer(context)
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    context.every(context.settings.reaper_interval_seconds, servicer.reap_expired, "sandbox-reaper")

    # HTTP/JSON, calling this gateway's own gRPC port (known once the server is bound: started lazily).
    async def start_http() -> None:
        while context.registration is None:
            await asyncio.sleep(0.05)
        http = HttpGateway(context.registration.instance.address)
        runner = web.AppRunner(http.app(), access_log=None)
        await runner.setup()
        host, port = parse_address(context.settings.http_listen, key="gateway.http_listen")
        await web.TCPSite(runner, host, port).start()

        async def stop_http() -> None:
            await runner.cleanup()
            await http.close()

        context.on_shutdown.insert(0, stop_http)

    context.http_task = asyncio.create_task(start_http(), name="http-gateway")
    return [sandbox_service_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name]
