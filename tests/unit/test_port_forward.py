"""PortForwardService end to end (gateway -> relay -> agent connect_start -> a TCP port on the guest's loopback),
against an in-process installation (fake VMM: the guest's loopback is this host's)."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from microvm.sandbox.v1 import port_forward_service_pb2 as api
from microvm.sandbox.v1 import port_forward_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from tests.etcd import free_port
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def caller(installation):
    caller = await tenant_caller(installation, f"ports-{installation.node}")
    caller.ports = port_forward_service_pb2_grpc.PortForwardServiceStub(caller.channel)
    reply = await caller.stub.CreateSandbox(sandbox_api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    caller.sandbox = reply.sandbox.name
    return caller


@pytest.fixture
async def echo_port():
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


def messages(first: api.ForwardPortRequest, *rest: api.ForwardPortRequest):
    async def gen():
        yield first
        for message in rest:
            yield message

    return gen()


async def test_bytes_go_both_ways_and_a_half_close_ends_the_call(caller, echo_port):
    payload = os.urandom(3 << 20)
    chunks = [api.ForwardPortRequest(data=payload[i : i + (1 << 20)]) for i in range(0, len(payload), 1 << 20)]
    call = caller.ports.ForwardPort(
        messages(
            api.ForwardPortRequest(target=api.PortTarget(sandbox=caller.sandbox, port=echo_port)),
            *chunks,
            api.ForwardPortRequest(close_write=api.CloseWrite()),
        ),
        metadata=caller.metadata,
        timeout=30,
    )
    events = [event async for event in call]
    assert events[0].WhichOneof("event") == "connected"
    received = b"".join(event.data for event in events[1:])
    assert received == payload + f"|{len(payload)}".encode()


async def test_nothing_listening_is_a_failed_precondition(caller):
    target = api.PortTarget(sandbox=caller.sandbox, port=free_port())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in caller.ports.ForwardPort(
            messages(api.ForwardPortRequest(target=target)), metadata=caller.metadata
        ):
            pass
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "nothing listens" in refused.value.details()


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (api.ForwardPortRequest(data=b"x"), "first message"),
        (api.ForwardPortRequest(target=api.PortTarget(port=80)), "sandbox"),
        (api.ForwardPortRequest(target=api.PortTarget(sandbox="sandboxes/x", port=70000)), "port"),
    ],
)
async def test_bad_openings_are_invalid_arguments(caller, first, says):
    if first.HasField("target") and first.target.sandbox == "sandboxes/x":
        first.target.sandbox = caller.sandbox
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in caller.ports.ForwardPort(messages(first), metadata=caller.metadata, timeout=10):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in refused.value.details()


async def test_a_bad_message_mid_stream_ends_the_call_at_once(caller, echo_port):
    call = caller.ports.ForwardPort(
        messages(
            api.ForwardPortRequest(target=api.PortTarget(sandbox=caller.sandbox, port=echo_port)),
            api.ForwardPortRequest(target=api.PortTarget(sandbox=caller.sandbox, port=echo_port)),
        ),
        metadata=caller.metadata,
        timeout=30,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_fuzz_found_a_refusal_while_the_caller_still_sends_keeps_its_status(caller):
    """The relay refused (nothing listens) while the caller's close_write messages were in flight: grpc's asyncio
    client reported INTERNAL (grpc/grpc#36066) until the gateway read them first."""
    for _ in range(5):
        call = caller.ports.ForwardPort(
            messages(
                api.ForwardPortRequest(target=api.PortTarget(sandbox=caller.sandbox, port=free_port())),
                api.ForwardPortRequest(close_write=api.CloseWrite()),
                api.ForwardPortRequest(close_write=api.CloseWrite()),
            ),
            metadata=caller.metadata,
            timeout=30,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
