"""PortForwarder against real sockets on 127.0.0.1: bytes both ways, half close, flow control, errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.network.exposure import parse_host_address
from services.network.ports import PortForwarder


@pytest.fixture
async def relayed():
    """(forwarder, host port) relaying to an echo server that answers EOF with the sha256 of what it got."""

    async def handle(reader, writer):
        digest = hashlib.sha256()
        while data := await reader.read(1 << 16):
            digest.update(data)
            writer.write(data)
            await writer.drain()
        writer.write(digest.hexdigest().encode())  # after the client's EOF: the half close reached us
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    forwarder = PortForwarder()
    port = await forwarder.open("127.0.0.1", 0, "127.0.0.1", server.sockets[0].getsockname()[1])
    yield forwarder, port
    await forwarder.close_all()
    server.close()


async def test_relays_both_directions_with_half_close(relayed):
    _, port = relayed
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(8 << 20)

    async def send():
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    assert received[: len(payload)] == payload
    assert received[len(payload) :] == hashlib.sha256(payload).hexdigest().encode()
    writer.close()


async def test_closing_the_exposure_ends_open_connections_and_frees_the_port(relayed):
    forwarder, port = relayed
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await forwarder.close("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_guest_that_does_not_answer_closes_the_client():
    forwarder = PortForwarder()
    with __import__("socket").socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]  # bound, never listening: connection refused
        port = await forwarder.open("127.0.0.1", 0, "127.0.0.1", dead_port)
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
    await forwarder.close_all()


async def test_a_free_port_of_a_range_is_chosen_and_a_full_range_is_resource_exhausted():
    forwarder = PortForwarder()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = await forwarder.open("127.0.0.1", 0, "127.0.0.1", 9)
        await forwarder.close("127.0.0.1", free)
        try:
            assert await forwarder.open_any("127.0.0.1", range(free, free + 1), "127.0.0.1", 9) == free
            with pytest.raises(ResourceExhausted) as error:  # its only port is taken (by us)
                await forwarder.open_any("127.0.0.1", range(free, free + 1), "127.0.0.1", 9)
            assert error.value.reason == "HOST_PORTS_EXHAUSTED"
            with pytest.raises(ResourceExhausted):
                await forwarder.open_any("127.0.0.1", range(busy, busy + 1), "127.0.0.1", 9)
        finally:
            await forwarder.close_all()


async def test_host_port_in_use_and_bad_address_are_clear_errors():
    forwarder = PortForwarder()
    port = await forwarder.open("127.0.0.1", 0, "127.0.0.1", 9)
    try:
        with pytest.raises(FailedPrecondition) as error:
            await forwarder.open("127.0.0.1", port, "127.0.0.1", 9)
        assert error.value.reason == "HOST_PORT_IN_USE"
        with pytest.raises(InvalidArgument):
            parse_host_address("localhost:80")
        with pytest.raises(FailedPrecondition) as error:
            await forwarder.open("192.0.2.1", 0, "127.0.0.1", 9)  # not an address of this host
        assert error.value.reason == "HOST_ADDRESS_UNUSABLE"
    finally:
        await forwarder.close_all()
