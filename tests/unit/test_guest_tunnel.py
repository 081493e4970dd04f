"""GuestTunnel (relay) over the agent's connect_start streams, with the real agent engine on this host: bytes both
ways under flow control, half-close, and clear statuses when nothing listens."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.relay.tunnel import GuestTunnel
from tests.etcd import free_port
from tests.unit.test_relay_with_host_agent import relay  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(60)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes everything, then says how much it got once the other side half-closed."""
    total = 0
    while data := await reader.read(1 << 16):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write(f"\ngot {total}\n".encode())
    await writer.drain()
    writer.close()


async def open_tunnel(relay, **target) -> GuestTunnel:  # noqa: F811
    return await GuestTunnel.open(await relay.relay.open_stream("host"), **target)


async def test_bytes_go_both_ways_beyond_every_window_and_half_close_ends_it(relay):  # noqa: F811
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(5 << 20)  # five times the agent's window and the relay's grant
    tunnel = await open_tunnel(relay, tcp_port=port)

    async def send() -> None:
        for start in range(0, len(payload), 300_000):
            await tunnel.write(payload[start : start + 300_000])
        await tunnel.write_eof()

    sending = asyncio.create_task(send())
    received = bytearray()
    while data := await tunnel.read():
        received += data
    await sending
    await tunnel.close()
    server.close()
    assert hashlib.sha256(received[: len(payload)]).digest() == hashlib.sha256(payload).digest()
    assert bytes(received[len(payload) :]) == f"\ngot {len(payload)}\n".encode()


async def test_lines_survive_a_reader_that_gives_up_waiting(relay, tmp_path):  # noqa: F811
    path = tmp_path / "lines.sock"

    async def slow_lines(reader, writer):
        writer.write(b"first half ")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"and the rest\nsecond\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(slow_lines, path=str(path))
    tunnel = await open_tunnel(relay, unix_path=str(path))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tunnel.readline(1 << 20), 0.05)
    assert await tunnel.readline(1 << 20) == b"first half and the rest\n"
    assert await tunnel.readline(1 << 20) == b"second\n"
    assert await tunnel.readline(1 << 20) == b""
    await tunnel.close()
    server.close()


async def test_a_unix_socket_deeper_than_a_socket_address_is_reached(relay, tmp_path):  # noqa: F811
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "server.sock"
    assert len(str(path)) > 108

    async def hello(reader, writer):
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    cwd = os.getcwd()
    os.chdir(deep)  # binding needs a short name; the agent must not
    try:
        server = await asyncio.start_unix_server(hello, path="server.sock")
    finally:
        os.chdir(cwd)
    tunnel = await open_tunnel(relay, unix_path=str(path))
    assert await tunnel.readline(100) == b"hello\n"
    await tunnel.close()
    server.close()


async def test_nothing_listening_gets_a_clear_status(relay, tmp_path):  # noqa: F811
    with pytest.raises(NotFound, match="no such socket") as missing:
        await open_tunnel(relay, unix_path=str(tmp_path / "absent.sock"))
    assert missing.value.reason == "SOCKET_NOT_FOUND"
    with pytest.raises(Unavailable, match="connection refused") as refused:
        await open_tunnel(relay, tcp_port=free_port())
    assert refused.value.reason == "CONNECTION_REFUSED"
    with pytest.raises(InvalidArgument, match="tcp_port"):
        await open_tunnel(relay, tcp_port=70000)
    with pytest.raises(InvalidArgument, match="absolute"):
        await open_tunnel(relay, unix_path="relative.sock")
