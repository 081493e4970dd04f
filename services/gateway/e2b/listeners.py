"""The two E2B doors of the gateway process: the control plane (`gateway.e2b_api_listen`) and the in-sandbox traffic
(`gateway.e2b_sandbox_listen`); an empty address leaves that door off.

Both are bound while the gateway is wired, before it registers, so a bad address fails the start and the bound
addresses (port 0: any free port) are published in the registration's metadata (`e2b_api`, `e2b_sandbox`), where
tests and tools find them. Requests reach the gateway's gRPC server over loopback (`Loopback`), whose address is
known once that server is bound: a request that comes before is 503.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from services.common.config import ConfigError, parse_address
from services.gateway.e2b import shapes
from services.gateway.e2b.control_plane import ControlPlane, authenticate
from services.gateway.e2b.http2 import DoorSite
from services.gateway.e2b.sandbox_traffic import SandboxTraffic

MESSAGE_BYTES = 8 << 20  # as the HTTP/JSON door's channel


class Loopback:
    """The gateway's own gRPC server, over loopback, for the E2B doors (one channel, made when first used)."""

    def __init__(self, context) -> None:
        self.context = context
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self.context.registration is None:
                raise shapes.E2bError(503, "the gateway is starting; try again")
            self._channel = grpc.aio.insecure_channel(
                self.context.registration.instance.address,
                options=[
                    ("grpc.max_receive_message_length", MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MESSAGE_BYTES),
                ],
            )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def start(context) -> None:
    settings = context.settings
    loopback = Loopback(context)

    async def principal_of(api_key: str):
        return await authenticate(context, api_key) if settings.require_auth else None

    doors = (
        ("e2b_api", settings.e2b_api_listen, lambda: ControlPlane(loopback, settings, principal_of).app()),
        ("e2b_sandbox", settings.e2b_sandbox_listen, lambda: SandboxTraffic(loopback, settings.require_auth).app()),
    )
    runners = []
    for name, listen, make_app in doors:
        if not listen:
            continue
        host, port = parse_address(listen, key=f"gateway.{name}_listen")
        # handler_cancellation: a stream whose caller hung up (a watch, a quiet process's output) ends at once
        # instead of at its next keepalive, up to 10 s later.
        runner = web.AppRunner(make_app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        try:
            await DoorSite(runner, host, port).start()  # HTTP/1.1 and h2c (http2.py)
        except OSError as error:
            for started in runners:
                await started.cleanup()
            raise ConfigError(f"gateway.{name}_listen: cannot bind {listen}: {error.strerror}") from None
        bound_host, bound_port = runner.addresses[0][:2]
        context.registration_metadata[name] = f"{bound_host}:{bound_port}"

    async def stop() -> None:
        for runner in runners:
            await runner.cleanup()
        await loopback.close()

    context.on_shutdown.insert(0, stop)
