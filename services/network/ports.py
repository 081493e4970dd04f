"""PortForwarder: exposed ports, host address:port -> guest address:port, as TCP relays in this process.

A user-space relay (like docker-proxy) works for loopback host addresses, where DNAT would need
route_localnet and hairpin NAT. Connections are accepted only while the sandbox's rules admit the guest
port (the output chain of the firewall), and end when the exposure is removed.
"""

from __future__ import annotations

import asyncio
import errno
import random

import structlog

from services.common.errors import FailedPrecondition, ResourceExhausted

log = structlog.get_logger()
WRITE_HIGH_WATER = 1 << 20
CONNECT_TIMEOUT = 5.0


class _Relay(asyncio.Protocol):
    """One direction-pair end of a relayed connection: what arrives here is written to `peer`, and reading
    pauses while the peer's send buffer is full (flow control without copying through stream buffers)."""

    def __init__(self, closed: asyncio.Future, peer: _Relay | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.closed = closed

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.peer is None:
            transport.pause_reading()  # the client waits until the guest end is connected

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True  # keep the other direction open (half close)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def join(self, peer: _Relay) -> None:
        self.peer, peer.peer = peer, self
        self.transport.resume_reading()


class _Listener:
    def __init__(self, server: asyncio.base_events.Server, guest: tuple[str, int]) -> None:
        self.server = server
        self.guest = guest
        self.connections: set[asyncio.Task] = set()


class PortForwarder:
    def __init__(self) -> None:
        # (host_address, host_port) -> listener
        self.listeners: dict[tuple[str, int], _Listener] = {}

    async def open(self, host_address: str, host_port: int, guest_address: str, guest_port: int) -> int:
        """Starts relaying; returns the host port (chosen by the kernel when `host_port` is 0)."""
        listener: _Listener | None = None

        loop = asyncio.get_running_loop()

        def accept() -> _Relay:
            client = _Relay(loop.create_future())
            task = loop.create_task(connect(client), name="exposed-port-connection")
            listener.connections.add(task)
            task.add_done_callback(listener.connections.discard)
            return client

        async def connect(client: _Relay) -> None:
            """Dials the guest for an accepted client and lives as long as the relayed connection."""
            try:
                _, guest = await asyncio.wait_for(
                    loop.create_connection(lambda: _Relay(client.closed, peer=client), *listener.guest), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError) as exc:
                log.info(
                    "exposed_port_connect_failed", guest=f"{listener.guest[0]}:{listener.guest[1]}", error=str(exc)
                )
                if client.transport is not None:
                    client.transport.close()
                return
            client.join(guest)
            try:
                await client.closed
            finally:
                for end in (client, guest):
                    if end.transport is not None:
                        end.transport.close()

        try:
            server = await loop.create_server(accept, host_address, host_port, reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FailedPrecondition(
                    f"host port {host_address}:{host_port} is already in use", reason="HOST_PORT_IN_USE"
                ) from None
            raise FailedPrecondition(
                f"cannot listen on {host_address}:{host_port}: {exc.strerror}", reason="HOST_ADDRESS_UNUSABLE"
            ) from None
        port = server.sockets[0].getsockname()[1]
        listener = _Listener(server, (guest_address, guest_port))
        self.listeners[(host_address, port)] = listener
        return port

    async def open_any(self, host_address: str, ports: range, guest_address: str, guest_port: int) -> int:
        """Starts relaying from a free port of `ports` (tried from a random one on); returns it."""
        start = random.randrange(len(ports))
        for index in range(len(ports)):
            port = ports[(start + index) % len(ports)]
            if (host_address, port) in self.listeners:
                continue
            try:
                return await self.open(host_address, port, guest_address, guest_port)
            except FailedPrecondition as exc:
                if exc.reason != "HOST_PORT_IN_USE":
                    raise
        raise ResourceExhausted(
            f"no free host port on {host_address} in {ports.start}-{ports.stop - 1}", reason="HOST_PORTS_EXHAUSTED"
        )

    async def close(self, host_address: str, host_port: int) -> None:
        listener = self.listeners.pop((host_address, host_port), None)
        if listener is None:
            return
        listener.server.close()
        for task in list(listener.connections):
            task.cancel()
        await listener.server.wait_closed()

    async def close_all(self) -> None:
        for host_address, host_port in list(self.listeners):
            await self.close(host_address, host_port)
