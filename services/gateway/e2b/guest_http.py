"""An HTTP request to any other port of a sandbox (`E2b-Sandbox-Port` not 49983 or 49999), forwarded to the server on
that port of the guest's loopback over our PortForwardService (one TCP connection per request, carried by the agent
channel, so it needs no guest networking).

The request goes as HTTP/1.0 with its body and a Content-Length: a 1.0 request gets an answer that is neither chunked
nor kept alive, so the answer's body is everything after its head until the guest's server closes; it is streamed
back as it comes. The connection is never half-closed from this side (close_write): some servers drop a half-closed
connection before answering. Nothing listening on the port is 502 in E2B's shape, as E2B's proxy answers.
A WebSocket upgrade (noVNC's, behind e2b-desktop's stream) is forwarded by guest_upgrade.py instead.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from microvm.sandbox.v1 import port_forward_service_pb2 as forward
from microvm.sandbox.v1 import port_forward_service_pb2_grpc
from services.gateway.e2b import guest_upgrade, shapes
from services.gateway.e2b.sandbox_call import SandboxCall

CHUNK = 1 << 20  # the most one ForwardPortRequest carries
MAX_HEAD = 64 << 10
# Hop-by-hop headers, the body's length (written anew), and ours: never passed on either way.
DROPPED = guest_upgrade.DROPPED_FROM_REQUEST


def request_head(request: web.Request, length: int) -> bytes:
    lines = [f"{request.method} {request.raw_path} HTTP/1.0"]
    lines += [f"{name}: {value}" for name, value in request.headers.items() if name.lower() not in DROPPED]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    status, headers = guest_upgrade.parse_answer_head(head)
    return status, [(name, value) for name, value in headers if name.lower() not in DROPPED]


async def handle(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    if guest_upgrade.asks_websocket_upgrade(request):
        return await guest_upgrade.handle(request, call)
    body = await request.read()

    async def requests():
        yield forward.ForwardPortRequest(target=forward.PortTarget(sandbox=f"sandboxes/{call.sandbox}", port=call.port))
        yield forward.ForwardPortRequest(data=request_head(request, len(body)))
        for start in range(0, len(body), CHUNK):
            yield forward.ForwardPortRequest(data=body[start : start + CHUNK])
        # No close_write: the request is delimited by its Content-Length, and many servers (aiohttp's among them)
        # drop a connection whose client half-closed before they answered.

    stub = port_forward_service_pb2_grpc.PortForwardServiceStub(call.channel)
    stream = stub.ForwardPort(requests(), metadata=call.metadata)
    buffered, response = b"", None
    try:
        async for event in stream:
            if event.WhichOneof("event") != "data":
                continue
            if response is not None:
                await response.write(event.data)
                continue
            buffered += event.data
            head, sep, rest = buffered.partition(b"\r\n\r\n")
            if not sep:
                if len(buffered) > MAX_HEAD:
                    return shapes.error_response(502, f"the server on port {call.port} did not answer HTTP")
                continue
            try:
                status, headers = parse_head(head)
            except ValueError as error:
                return shapes.error_response(502, f"the server on port {call.port}: {error}")
            response = web.StreamResponse(status=status)
            for name, value in headers:
                response.headers.add(name, value)
            await response.prepare(request)
            if rest:
                await response.write(rest)
    except grpc.aio.AioRpcError as error:
        if response is not None:  # the head is gone: the answer just ends
            return response
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return shapes.error_response(502, f"the sandbox is running but nothing listens on port {call.port}")
        return shapes.grpc_error_response(error)
    if response is None:
        return shapes.error_response(502, f"the server on port {call.port} closed without an answer")
    await response.write_eof()
    return response
