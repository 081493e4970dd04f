"""PortForwarder: exposed ports, host address:port -> guest address:port, as TCP relays in this process.

A user-space relay (like docker-proxy) works for loopback host addresses, where DNAT would need
route_localnet and hairpin NAT. Connections are accepted only while the sandbox's rules admit the guest
port (the output chain of the firewall), and end when the exposure is removed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress

import structlog

from services.common.errors import FailedPrecondition, InvalidArgument

log = structlog.get_logger()
BUFFER = 64 << 10
CONNECT_TIMEOUT = 5.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class _Listener:
    def __init__(self, server: asyncio.base_events.Server, guest: tuple[str, int]) -> None:
        self.server = server
        self.guest = guest
        self.connections: set[asyncio.Task] = set()


class PortForwarder:
    def __init__(self) -> None:
        # (host_address, host_port) -> listener
        self.listeners: dict[tuple[str, int], _Listener] = {}

    @staticmethod
    def check_host_address(host_address: str) -> str:
        try:
            return str(ipaddress.ip_address(host_address or "127.0.0.1"))
        except ValueError:
            raise InvalidArgument(f"host_address {host_address!r} is not an IP address",
                                  reason="INVALID_HOST_ADDRESS") from None

    async def open(self, host_address: str, host_port: int, guest_address: str, guest_port: int) -> int:
        """Starts relaying; returns the host port (chosen by the kernel when `host_port` is 0)."""
        listener: _Listener | None = None

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            listener.connections.add(task)
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(*listener.guest), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("exposed_port_connect_failed", guest=f"{listener.guest[0]}:{listener.guest[1]}",
                         error=str(exc))
                writer.close()
                listener.connections.discard(task)
                return
            try:
                await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
            finally:
                for w in (writer, upstream_writer):
                    w.close()
                listener.connections.discard(task)

        try:
            server = await asyncio.start_server(accept, host_address, host_port, reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FailedPrecondition(f"host port {host_address}:{host_port} is already in use",
                                         reason="HOST_PORT_IN_USE") from None
            raise FailedPrecondition(f"cannot listen on {host_address}:{host_port}: {exc.strerror}",
                                     reason="HOST_ADDRESS_UNUSABLE") from None
        port = server.sockets[0].getsockname()[1]
        listener = _Listener(server, (guest_address, guest_port))
        self.listeners[(host_address, port)] = listener
        return port

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
