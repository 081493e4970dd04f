"""Wiring of the gateway: the public SandboxService and the expiry reaper."""

from __future__ import annotations

import asyncio

from microvm.sandbox.v1 import sandbox_service_pb2, sandbox_service_pb2_grpc
from services.common.server import ServiceContext
from services.common.settings import GatewaySettings
from services.gateway.access import AccessInterceptor
from services.gateway.sandboxes import SandboxServicer


def interceptors(context: ServiceContext[GatewaySettings]) -> list:
    settings = context.settings
    return [AccessInterceptor(context, settings.rate_limit_per_second, settings.rate_limit_burst)] \
        if settings.require_auth else []


async def wire(server, context: ServiceContext[GatewaySettings]) -> list[str]:
    servicer = SandboxServicer(context)
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    reaper = asyncio.create_task(servicer.reap_expired(), name="sandbox-reaper")

    async def stop_reaper() -> None:
        reaper.cancel()
        try:
            await reaper
        except asyncio.CancelledError:
            pass

    context.on_shutdown.append(stop_reaper)
    return [sandbox_service_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name]
