"""A WebSocket upgrade to any other port of a sandbox (what guest_http.py gets with `Connection: upgrade` and
`Upgrade: websocket`: noVNC's /websockify behind e2b-desktop's stream, any guest server's WebSocket), forwarded over
one PortForwardService call as guest_http.py forwards plain HTTP.

The request head goes as HTTP/1.1 with its Upgrade, Connection and Sec-WebSocket-* headers; ours (the sandbox's
credential and routing headers) stay at the door. A 101 from the guest's server is answered to the client with that
server's headers, and from then on the connection's bytes pass both ways unchanged: the WebSocket is the client's and
the guest server's (subprotocol, extensions, pings and close codes are theirs), whatever it carries. Either side
closing ends the other: the client's close cancels the call (which closes the guest's connection), the end of the
call closes the client's connection. Any other answer is passed on as an HTTP answer, its body framed by its
Content-Length, its chunks or its end.

Only WebSocket upgrades are spliced: aiohttp's request parser hands a connection's later bytes over only after
`Upgrade: websocket` (any other upgrade it goes on parsing as HTTP), so other upgrades go through guest_http.py as
plain HTTP, their upgrade headers dropped, and are answered as the guest's server answers a plain request.

Neither side buffers without bound: the guest's bytes are written to the client as aiohttp's writer drains, so a slow
client slows the call (and the relay, the guest's server); the client's bytes are read off its connection only while
fewer than CLIENT_BUFFER of them wait for the call to take them.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import structlog
from aiohttp import web

from microvm.sandbox.v1 import port_forward_service_pb2 as forward
from microvm.sandbox.v1 import port_forward_service_pb2_grpc
from services.gateway.e2b import shapes
from services.gateway.e2b.sandbox_call import SandboxCall

log = structlog.get_logger()
CHUNK = 1 << 20  # the most one ForwardPortRequest carries
MAX_HEAD = 64 << 10
HEAD_SECONDS = 60.0  # for the guest's server to answer the upgrade request
CLIENT_BUFFER = 1 << 20  # the client's bytes held at most before its connection is no longer read
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
# Not passed to the guest: hop-by-hop (the upgrade's own two are written anew), the body's length (written anew), ours.
DROPPED_FROM_REQUEST = HOP_BY_HOP | {
    "content-length",
    "e2b-sandbox-id",
    "e2b-sandbox-port",
    "x-access-token",
    "e2b-traffic-access-token",
    "x-api-key",
}
# Not passed to the client with the guest's 101: it keeps Connection and Upgrade, the switch itself.
DROPPED_FROM_SWITCH = (HOP_BY_HOP - {"connection", "upgrade"}) | {"content-length"}
# Not passed on with any other answer: aiohttp frames the body anew.
DROPPED_FROM_ANSWER = HOP_BY_HOP | {"content-length"}


def asks_websocket_upgrade(request: web.Request) -> bool:
    """As aiohttp's parser decides to hand the connection over: an `upgrade` Connection token and Upgrade websocket."""
    tokens = {token.strip().lower() for value in request.headers.getall("Connection", []) for token in value.split(",")}
    return "upgrade" in tokens and request.headers.get("Upgrade", "").strip().lower() == "websocket"


def upgrade_head(request: web.Request, length: int) -> bytes:
    lines = [f"{request.method} {request.raw_path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in request.headers.items() if name.lower() not in DROPPED_FROM_REQUEST]
    lines += ["Connection: Upgrade", f"Upgrade: {request.headers['Upgrade'].strip()}"]
    if length:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_answer_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """An HTTP answer's status and every header (ValueError when it is not one)."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


class GuestBytes:
    """The guest server's bytes off the call's answers, with what was read ahead of the caller."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.ahead = b""

    async def _more(self) -> bool:
        while (event := await self.stream.read()) is not grpc.aio.EOF:
            if event.data:  # `connected` carries none
                self.ahead += event.data
                return True
        return False

    async def some(self) -> bytes:
        """The next bytes, b"" once the guest's server has closed."""
        if not self.ahead and not await self._more():
            return b""
        data, self.ahead = self.ahead, b""
        return data

    async def until(self, separator: bytes, most: int) -> bytes:
        """The bytes up to `separator`, which is consumed (ValueError past `most` bytes without it or at the end)."""
        while (at := self.ahead.find(separator)) < 0:
            if len(self.ahead) > most or not await self._more():
                raise ValueError("the answer ended or grew too long without its end of line")
        found, self.ahead = self.ahead[:at], self.ahead[at + len(separator) :]
        return found

    async def exactly(self, count: int):
        """`count` bytes, in pieces as they come (ValueError when the guest's server closes before)."""
        while count > 0:
            if not self.ahead and not await self._more():
                raise ValueError("the answer ended before its length")
            piece, self.ahead = self.ahead[:count], self.ahead[count:]
            count -= len(piece)
            yield piece


class ClientBytes:
    """What the client sends after the 101, fed by aiohttp's connection as it reads it.

    Taking a connection over after a 101 is what aiohttp's WebSocketResponse does with `set_parser`: the connection
    hands every later byte to the parser it was given (`feed_data`, and `feed_eof` when the connection is lost), while
    aiohttp still owns the connection (its close, cancelling the handler when the client goes, its shutdown). That is
    the least intrusive of the ways in: replacing the transport's protocol would leave aiohttp's request handler
    waiting on a connection it no longer sees, and `request.content` ends with the request's body, before the switch.
    This object is that parser, duck-typed: it hands bytes on unparsed and stops the connection's reading (the
    protocol's own pause_reading and resume_reading, as aiohttp's WebSocket reader does) while CLIENT_BUFFER wait.
    """

    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.ended = False
        self.paused = False
        self.arrived = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """aiohttp's call for bytes read off the connection: (the protocol ended, bytes of the next message)."""
        if data:
            self.chunks.append(bytes(data))
            self.size += len(data)
            self.arrived.set()
            if self.size >= CLIENT_BUFFER and not self.paused:
                self.paused = True
                self.protocol.pause_reading()
        return False, b""

    def feed_eof(self) -> None:
        self.ended = True
        self.arrived.set()

    async def read(self, most: int) -> bytes:
        """The next bytes, at most `most`; b"" once the client's connection is gone."""
        while not self.chunks:
            if self.ended:
                return b""
            self.arrived.clear()
            await self.arrived.wait()
        taken, count = [], 0
        while self.chunks and count < most:
            chunk = self.chunks.popleft()
            if count + len(chunk) > most:
                chunk, rest = chunk[: most - count], chunk[most - count :]
                self.chunks.appendleft(rest)
            taken.append(chunk)
            count += len(chunk)
        self.size -= count
        if self.paused and self.size < CLIENT_BUFFER // 2:
            self.paused = False
            self.protocol.resume_reading()
        return b"".join(taken)


async def handle(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    body = await request.read()
    stub = port_forward_service_pb2_grpc.PortForwardServiceStub(call.channel)
    stream = stub.ForwardPort(metadata=call.metadata)
    try:
        return await _forward(request, call, stream, body)
    finally:
        stream.cancel()  # nothing once the call has ended; else it closes the guest's connection


async def _forward(request: web.Request, call: SandboxCall, stream, body: bytes) -> web.StreamResponse:
    guest = GuestBytes(stream)
    try:
        target = forward.PortTarget(sandbox=f"sandboxes/{call.sandbox}", port=call.port)
        await stream.write(forward.ForwardPortRequest(target=target))
        sent = upgrade_head(request, len(body)) + body
        for start in range(0, len(sent), CHUNK):
            await stream.write(forward.ForwardPortRequest(data=sent[start : start + CHUNK]))
        async with asyncio.timeout(HEAD_SECONDS):
            status, headers = parse_answer_head(await guest.until(b"\r\n\r\n", MAX_HEAD))
            while 100 <= status < 200 and status != 101:  # 100 Continue and the like: the answer follows
                status, headers = parse_answer_head(await guest.until(b"\r\n\r\n", MAX_HEAD))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return shapes.error_response(502, f"the sandbox is running but nothing listens on port {call.port}")
        return shapes.grpc_error_response(error)
    except TimeoutError:
        return shapes.error_response(504, f"the server on port {call.port} did not answer in {HEAD_SECONDS:.0f} s")
    except ValueError as error:
        return shapes.error_response(502, f"the server on port {call.port} did not answer HTTP: {error}")
    if status == 101:
        return await _splice(request, call, stream, guest, headers)
    return await _pass_on(request, guest, status, headers)


async def _pass_on(request: web.Request, guest: GuestBytes, status: int, headers) -> web.StreamResponse:
    """Any answer but a switch, as guest_http.py passes answers on: once its head is gone, a failure just ends it."""
    framing = {name.lower(): value.lower() for name, value in headers}
    response = web.StreamResponse(status=status)
    for name, value in headers:
        if name.lower() not in DROPPED_FROM_ANSWER:
            response.headers.add(name, value)
    await response.prepare(request)
    try:
        if request.method == "HEAD" or status in (204, 304):
            pass
        elif "chunked" in framing.get("transfer-encoding", ""):
            await _copy_chunks(guest, response)
        elif framing.get("content-length", "").isdigit():
            async for piece in guest.exactly(int(framing["content-length"])):
                await response.write(piece)
        else:
            while data := await guest.some():
                await response.write(data)
    except (grpc.aio.AioRpcError, ValueError):
        return response
    await response.write_eof()
    return response


async def _copy_chunks(guest: GuestBytes, response: web.StreamResponse) -> None:
    """A chunked body's data (its trailers are dropped, as hop-by-hop)."""
    while size := int((await guest.until(b"\r\n", MAX_HEAD)).split(b";", 1)[0], 16):  # ValueError when no size
        async for piece in guest.exactly(size):
            await response.write(piece)
        if await guest.until(b"\r\n", 2):
            raise ValueError("a chunk longer than its size")


async def _splice(request: web.Request, call: SandboxCall, stream, guest: GuestBytes, headers) -> web.StreamResponse:
    response = web.StreamResponse(status=101)
    for name, value in headers:
        if name.lower() not in DROPPED_FROM_SWITCH:
            response.headers.add(name, value)
    response.force_close()  # no HTTP follows a switch: aiohttp closes the connection once this handler returns
    await response.prepare(request)
    client = ClientBytes(request.protocol)
    request.protocol.set_parser(client)
    upstream = asyncio.create_task(_client_to_guest(client, stream), name="e2b-upgrade-upstream")
    downstream = asyncio.create_task(_guest_to_client(guest, response), name="e2b-upgrade-downstream")
    try:
        await asyncio.wait((upstream, downstream), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: aiohttp does that when the client's connection is lost
        upstream.cancel()
        downstream.cancel()
        stream.cancel()
        ends = await asyncio.gather(upstream, downstream, return_exceptions=True)
    failures = [repr(end) for end in ends if isinstance(end, Exception) and not _expected_end(end)]
    if failures:
        log.info("e2b_upgrade_ended_by_failure", sandbox=call.sandbox, port=call.port, failures=failures)
    return response


async def _client_to_guest(client: ClientBytes, stream) -> None:
    while data := await client.read(CHUNK):
        await stream.write(forward.ForwardPortRequest(data=data))  # returns as the call's flow control takes it


async def _guest_to_client(guest: GuestBytes, response: web.StreamResponse) -> None:
    while data := await guest.some():
        await response.write(data)  # drains when aiohttp's writer has buffered enough


def _expected_end(error: Exception) -> bool:
    """How a side ends when the other went first: a write to a closed connection, or a cancelled call."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() == grpc.StatusCode.CANCELLED
    return isinstance(error, ConnectionError | asyncio.InvalidStateError)
