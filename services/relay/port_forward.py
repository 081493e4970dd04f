"""GuestPorts: ForwardPort on a guest, one GuestTunnel (agent connect_start to a TCP port on the guest's loopback)
per call. The caller's bytes go in as they come, within the credit the agent grants; the guest server's bytes go
out as gRPC takes them (the tunnel grants the agent credit only then), so neither side buffers without bound."""

from __future__ import annotations

import asyncio
import contextlib

from microvm.sandbox.v1 import port_forward_service_pb2 as api
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.relay.guest_io import sandbox_id
from services.relay.tunnel import GuestTunnel

MAX_CHUNK = 1 << 20


def check_target(target: api.PortTarget) -> None:
    if not 0 < target.port < 65536:
        raise InvalidArgument(f"port must be 1..65535, got {target.port}", reason="INVALID_REQUEST")


class GuestPorts:
    def __init__(self, open_stream) -> None:
        self.open_stream = open_stream

    async def _connect(self, target: api.PortTarget) -> GuestTunnel:
        check_target(target)
        stream = await self.open_stream(sandbox_id(target.sandbox))
        try:
            return await GuestTunnel.open(stream, tcp_port=target.port)
        except (NotFound, Unavailable) as exc:
            if exc.reason != "CONNECTION_REFUSED":
                raise
            raise FailedPrecondition(
                f"nothing listens on port {target.port} of {target.sandbox}'s loopback", reason="PORT_NOT_LISTENING"
            ) from None

    async def forward(self, requests):
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("request") != "target":
            raise InvalidArgument("the first message must carry the target", reason="INVALID_REQUEST")
        tunnel = await self._connect(first.target)
        upstream = asyncio.create_task(self._upstream(requests, tunnel), name="port-forward-upstream")
        try:
            yield api.ForwardPortResponse(connected=api.PortConnected())
            while data := await self._next(tunnel, upstream):
                yield api.ForwardPortResponse(data=data)
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upstream
            await tunnel.close()

    @staticmethod
    async def _next(tunnel: GuestTunnel, upstream: asyncio.Task) -> bytes:
        """The guest's next bytes; a bad message from the caller ends the call at once with its status (also when
        it failed before this read began: then no read would ever end a quiet guest's call)."""
        if upstream.done() and not upstream.cancelled() and upstream.exception() is not None:
            raise upstream.exception()
        if not upstream.done():
            reading = asyncio.ensure_future(tunnel.read())
            try:
                await asyncio.wait({reading, upstream}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the call was cancelled: no read task left pending (a read loses nothing)
                reading.cancel()
                raise
            if reading.done():
                return reading.result()
            if not upstream.cancelled() and upstream.exception() is not None:
                reading.cancel()  # safe: a read loses nothing when cancelled
                raise upstream.exception()
            return await reading
        return await tunnel.read()

    @staticmethod
    async def _upstream(requests, tunnel: GuestTunnel) -> None:
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "data":
                if len(message.data) > MAX_CHUNK:
                    raise InvalidArgument(f"a chunk is at most {MAX_CHUNK} bytes", reason="INVALID_REQUEST")
                await tunnel.write(message.data)
            elif kind == "close_write":
                await tunnel.write_eof()
                return
            else:
                raise InvalidArgument("only data and close_write may follow the target", reason="INVALID_REQUEST")
