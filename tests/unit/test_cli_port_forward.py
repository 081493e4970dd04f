"""`mvm port-forward ID [LOCAL:]GUEST...`: its parsing, then the command itself as a process of its own against an
in-process installation (fake VMM: the guest's loopback is this host's, so an echo server on 127.0.0.1 here is a
server on the guest's loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys

import pytest

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from mvm_cli.main import parse
from tests.etcd import free_port
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


# --- parsing ------------------------------------------------------------------------------------------------
def test_mappings_take_a_local_port_the_same_port_or_a_free_one():
    args = parse(["port-forward", "sbx-1", "8080:80", "5900", ":22", "--address", "0.0.0.0"])
    assert (args.id, args.mappings, args.address) == ("sbx-1", [(8080, 80), (5900, 5900), (0, 22)], "0.0.0.0")
    assert parse(["port-forward", "sbx-1", "80"]).address == "127.0.0.1"


@pytest.mark.parametrize("bad", ["http", "80:", "8080:0", "70000:80", "1:2:3"])
def test_a_bad_mapping_is_a_usage_error(bad):
    with pytest.raises(SystemExit) as exited:
        parse(["port-forward", "sbx-1", bad])
    assert exited.value.code == 2


# --- against an installation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def sandbox(installation):
    caller = await tenant_caller(installation, f"clifwd-{installation.node}")
    gateway = await installation.address("gateway")
    client = AsyncClient(gateway, caller.key)
    sandbox = await AsyncSandbox.create(client=client)
    sandbox.gateway, sandbox.key = gateway, caller.key
    yield sandbox
    await sandbox.kill()
    await client.close()


@pytest.fixture
async def echo_port():
    """An echo server (at the client's EOF it answers `|<bytes read>` and closes)."""

    async def echo(reader, writer):
        total = 0
        while data := await reader.read(1 << 16):
            total += len(data)
            writer.write(data)
            await writer.drain()
        writer.write(f"|{total}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def start_mvm(sandbox, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        "--gateway",
        sandbox.gateway,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MVM_API_KEY": sandbox.key},
    )


async def forwarding_line(process: asyncio.subprocess.Process) -> tuple[str, int, str]:
    """The next `forwarding HOST:PORT -> ID:GUEST` line: (host, port, `ID:GUEST`)."""
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    match = re.fullmatch(r"forwarding (\S+):(\d+) -> (\S+)\n", line)
    assert match, line
    return match[1], int(match[2]), match[3]


async def exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send():
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    received = await reader.read()
    await sending
    writer.close()
    return received


async def test_port_forward_carries_bytes_reports_failures_and_stops_cleanly_on_ctrl_c(sandbox, echo_port):
    missing = free_port()
    process = await start_mvm(sandbox, "port-forward", sandbox.id, f":{echo_port}", f":{missing}")
    host, port, target = await forwarding_line(process)
    assert (host, target) == ("127.0.0.1", f"{sandbox.id}:{echo_port}")
    _, refused_port, refused_target = await forwarding_line(process)
    assert refused_target == f"{sandbox.id}:{missing}"

    payload = os.urandom((2 << 20) + 7)
    received = await exchange(port, payload)
    echoed, _, count = received.rpartition(b"|")
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest() and count == str(len(payload)).encode()
    both = await asyncio.gather(exchange(port, b"one"), exchange(port, b"two"))
    assert both == [b"one|3", b"two|3"]

    reader, writer = await asyncio.open_connection("127.0.0.1", refused_port)
    try:
        assert await reader.read() == b""
    except ConnectionResetError:
        pass
    writer.close()
    error = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    assert error.startswith(f"mvm: port-forward {sandbox.id}:{missing}: FAILED_PRECONDITION:"), error
    assert "nothing listens" in error

    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_sigterm_stops_it_too_and_address_and_local_port_are_used(sandbox, echo_port):
    local = free_port()
    process = await start_mvm(sandbox, "port-forward", "--address", "127.0.0.1", sandbox.id, f"{local}:{echo_port}")
    assert await forwarding_line(process) == ("127.0.0.1", local, f"{sandbox.id}:{echo_port}")
    assert await exchange(local, b"hi") == b"hi|2"
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0 and out == b"", err.decode()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", local)


async def test_a_missing_sandbox_or_a_taken_port_fails_at_once(sandbox, echo_port):
    process = await start_mvm(sandbox, "port-forward", "sbx-nope", "80")
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2 and out == b"" and err.decode().startswith("mvm: NOT_FOUND:")
    taken = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    process = await start_mvm(sandbox, "port-forward", sandbox.id, f"{port}:{echo_port}")
    out, err = await asyncio.wait_for(process.communicate(), 30)
    taken.close()
    assert process.returncode == 1 and err.decode().startswith(f"mvm: cannot listen on 127.0.0.1:{port}:"), err
