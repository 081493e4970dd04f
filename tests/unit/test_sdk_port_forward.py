"""The SDK's `forward_port` (a local listener, one PortForwardService call per connection), async and sync, against an
in-process installation (fake VMM: the guest's loopback is this host's, so an echo server on 127.0.0.1 here is a
server on the guest's loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket

import pytest

from microvm_sandbox import AsyncSandbox, Client, FailedPreconditionError, InvalidArgumentError, Sandbox
from microvm_sandbox.aio import AsyncClient
from microvm_sandbox.port_forward import AsyncPortForward
from microvm_sandbox.port_forward_sync import PortForward
from tests.etcd import free_port
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture(scope="module")
async def installation(installation):
    caller = await tenant_caller(installation, f"sdkfwd-{installation.node}")
    installation.gateway = await installation.address("gateway")
    installation.key = caller.key
    return installation


@pytest.fixture(scope="module")
async def sandbox(installation):
    client = AsyncClient(installation.gateway, installation.key)
    sandbox = await AsyncSandbox.create(client=client)
    yield sandbox
    await sandbox.kill()
    await client.close()


class EchoServer:
    """Echoes what it reads; at the client's EOF it answers `|<bytes read>` and closes."""

    def __init__(self) -> None:
        self.saw_eof = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                total += len(data)
                writer.write(data)
                await writer.drain()
            self.saw_eof += 1
            writer.write(f"|{total}".encode())
            await writer.drain()
        writer.close()


@pytest.fixture
async def echo():
    echo = EchoServer()
    server = await asyncio.start_server(echo.serve, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    yield echo
    server.close()


async def exchange(port: int, payload: bytes) -> bytes:
    """Sends `payload` through 127.0.0.1:port while reading, then half-closes; everything that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    received = await reader.read()
    await sending
    writer.close()
    return received


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the connection ends (EOF or reset) without more bytes."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


# --- async --------------------------------------------------------------------------------------------------
async def test_bytes_go_both_ways_and_a_half_close_still_gets_the_answer(sandbox, echo):
    payload = os.urandom(3 * MIB + 12345)
    async with sandbox.forward_port(echo.port) as forward:
        assert isinstance(forward, AsyncPortForward) and forward.local_address == f"127.0.0.1:{forward.local_port}"
        received = await exchange(forward.local_port, payload)
    echoed, _, count = received.rpartition(b"|")
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert count == str(len(payload)).encode() and echo.saw_eof == 1  # it saw EOF, and answered after it
    assert forward.last_error is None


async def test_two_connections_share_one_forward_at_once(sandbox, echo):
    forward = await sandbox.forward_port(echo.port)
    try:
        first = await asyncio.open_connection("127.0.0.1", forward.local_port)
        second = await asyncio.open_connection("127.0.0.1", forward.local_port)
        for index, (_, writer) in enumerate((first, second)):
            writer.write(f"hello {index}".encode())
            await writer.drain()
        assert [await reader.readexactly(7) for reader, _ in (second, first)] == [b"hello 1", b"hello 0"]
        assert forward.connections == 2
        big = os.urandom(2 * MIB)
        both = await asyncio.gather(exchange(forward.local_port, big), exchange(forward.local_port, big[::-1]))
        assert both == [big + f"|{len(big)}".encode(), big[::-1] + f"|{len(big)}".encode()]
        for reader, writer in (first, second):
            writer.write_eof()
            assert await reader.read() == b"|7"
            writer.close()
    finally:
        await forward.close()


async def test_nothing_listening_resets_the_connection_and_keeps_the_reason(sandbox):
    seen = []
    async with sandbox.forward_port(free_port(), on_error=seen.append) as forward:
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.local_port)
        writer.write(b"anyone?")
        assert await closed_by_peer(reader)
        writer.close()
        error = forward.last_error
        assert isinstance(error, FailedPreconditionError) and error.reason == "PORT_NOT_LISTENING"
        assert seen == [error] and list(forward.errors) == [error]
        # The listener goes on: the next connection fails the same way, on its own.
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.local_port)
        assert await closed_by_peer(reader)
        writer.close()
        assert len(forward.errors) == 2


async def test_closing_the_forward_ends_its_connections_and_its_listener(sandbox, echo):
    forward = await sandbox.forward_port(echo.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.local_port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    await forward.close()
    assert await closed_by_peer(reader) and forward.connections == 0
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", forward.local_port)
    await forward.close()  # a second close is a no-op


async def test_a_chosen_local_port_and_bad_ports(sandbox, echo):
    port = free_port()
    async with sandbox.forward_port(echo.port, local_port=port, local_host="127.0.0.1") as forward:
        assert forward.local_port == port and await exchange(port, b"x") == b"x|1"
        with pytest.raises(OSError):  # taken
            await sandbox.forward_port(echo.port, local_port=port)
    for guest_port in (0, 70000):
        with pytest.raises(InvalidArgumentError):
            await sandbox.forward_port(guest_port)


# --- the synchronous SDK ------------------------------------------------------------------------------------
def sync_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_sync_sdk_forwards_the_same_way(installation, sandbox, echo):
    payload = os.urandom(MIB + 1)
    missing = free_port()

    def use() -> None:
        client = Client(installation.gateway, installation.key)
        sync_sandbox = Sandbox.connect(sandbox.id, client=client)
        with sync_sandbox.forward_port(echo.port) as forward:
            assert isinstance(forward, PortForward) and forward.local_address == f"127.0.0.1:{forward.local_port}"
            assert sync_exchange(forward.local_port, payload) == payload + f"|{len(payload)}".encode()
            assert forward.last_error is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", forward.local_port))
        with sync_sandbox.forward_port(missing) as refused:
            with socket.create_connection(("127.0.0.1", refused.local_port)) as connection:
                with contextlib.suppress(ConnectionResetError):
                    assert connection.recv(1) == b""
            assert refused.last_error is not None and refused.last_error.reason == "PORT_NOT_LISTENING"
        client.close()

    await asyncio.to_thread(use)
