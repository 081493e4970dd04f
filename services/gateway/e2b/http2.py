"""h2c on the E2B doors: HTTP/2 with prior knowledge beside HTTP/1.1 on the same port (Connect clients such as
connect-go, connect-es or httpx with http2 speak h2 to envd; TLS, and h2 by ALPN, end at the proxy in front).

`DoorSite` is the door's listening socket. A new connection is read until its first bytes tell: anything that is
not the h2 preface (`PRI * HTTP/2.0...`) is handed, with the bytes already read, to aiohttp's own protocol, which
then owns the transport (HTTP/1.1 pays one look at its first bytes, nothing per request). A preface makes an
`H2cConnection` (the sans-IO `h2` library on the asyncio transport), which serves each stream through the same
aiohttp application, with no second implementation of any route: the stream is forwarded as an HTTP/1.1 request
to that application's own server on a private unix socket, bodies streamed both ways. Connect's unary and
server-streaming calls need no trailers over HTTP (the end of a stream is in the body), so none are sent.

Flow control holds end to end: a request body is acknowledged to the client only once it has been written upstream
(at most STREAM_WINDOW bytes of it wait here), and a response body is read from upstream only as fast as the
client's window and the socket take it. A client's RST_STREAM cancels the forwarded request, which closes its
upstream connection and so cancels the handler (the doors run with handler_cancellation). Each H2cConnection is
registered with the application's server like aiohttp's own connections, so the runner's graceful shutdown covers
it: a GOAWAY first (streams in flight finish, new ones are refused), then the same timeout as HTTP/1.1 requests.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import structlog
from aiohttp import web
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from yarl import URL

from services.gateway.e2b.http2_headers import UpstreamRequestError, declared_length, response_headers, upstream_request

log = structlog.get_logger()

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Request body bytes a stream may have in flight: an upload goes at most a window per round trip (h2's default,
# 64 KiB, is 6.5 MB/s at 10 ms; 1 MiB is 100 MB/s).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 8 << 20  # and all streams of a connection together: what a connection may hold here
IDLE_SECONDS = 75.0  # a connection without streams is closed after this, as aiohttp's keep-alive does HTTP/1.1
CONNECT_SECONDS = 10.0  # to the private socket; a forwarded request then lives as long as its client wants


class DoorSite(web.BaseSite):
    """A TCP site of an AppRunner whose port speaks HTTP/1.1 and h2c. `runner.addresses` lists its TCP address."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._undecided: set[UndecidedConnection] = set()  # connections whose protocol is not known yet
        self._upstream: asyncio.AbstractServer | None = None
        self._socket_dir: str | None = None

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        # A directory only this user enters: the socket serves what the TCP port serves, to nobody else.
        self._socket_dir = tempfile.mkdtemp(prefix="mvm-h2c-")
        upstream_path = str(Path(self._socket_dir) / "door.sock")
        self._upstream = await loop.create_unix_server(self._runner.server, upstream_path)
        self._server = await loop.create_server(
            lambda: UndecidedConnection(self, self._runner.server, upstream_path),
            self._host,
            self._port,
            backlog=self._backlog,
        )

    async def stop(self) -> None:
        for connection in list(self._undecided):
            connection.transport.close()
        if self._upstream is not None:
            self._upstream.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        await super().stop()


class UndecidedConnection(asyncio.Protocol):
    """A new connection of a DoorSite until its first bytes say which protocol it speaks."""

    def __init__(self, site: DoorSite, server: web.Server, upstream_path: str) -> None:
        self.site, self.server, self.upstream_path = site, server, upstream_path
        self.transport: asyncio.Transport | None = None
        self.received = b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.site._undecided.add(self)

    def data_received(self, data: bytes) -> None:
        self.received += data
        head = self.received[: len(PREFACE)]
        if head == PREFACE:
            self._hand_to(H2cConnection(self.server, self.upstream_path))
        elif not PREFACE.startswith(head):  # "G", "PO", "PU": HTTP/1.1 at the first byte that differs
            self._hand_to(self.server())  # aiohttp's RequestHandler, as a TCPSite would have made

    def eof_received(self) -> bool:
        return False  # only a fragment of the preface came: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.site._undecided.discard(self)

    def _hand_to(self, protocol: asyncio.Protocol) -> None:
        self.site._undecided.discard(self)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(self.received)


@dataclass(eq=False)
class InboundStream:
    id: int
    headers: list[tuple[bytes, bytes]]
    body: asyncio.Queue = field(default_factory=asyncio.Queue)  # request body chunks, then None
    request_ended: bool = False
    received: int = 0  # request body bytes received
    unacknowledged: int = 0  # request body bytes received and not yet forwarded (their window is still closed)
    window_open: asyncio.Event = field(default_factory=asyncio.Event)  # the client granted more window
    task: asyncio.Task | None = None


class H2cConnection(asyncio.Protocol):
    """One h2c connection: its streams forwarded to the application's server at `upstream_path`.

    The attributes web.Server uses of its connections are those of aiohttp's RequestHandler: `close()` (stop
    taking requests), `shutdown(timeout)`, and `_task_handler`, the connection's task, awaited before it is
    forgotten."""

    def __init__(self, server: web.Server, upstream_path: str) -> None:
        self.server, self.upstream_path = server, upstream_path
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, InboundStream] = {}
        self.going_away = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self._idle: asyncio.TimerHandle | None = None
        self._upstream: aiohttp.ClientSession | None = None
        self._task_handler: asyncio.Task | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - self.h2.inbound_flow_control_window)
        self._flush()
        self._upstream = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(self.upstream_path, limit=0),  # h2's MAX_CONCURRENT_STREAMS bounds it
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_SECONDS),
            auto_decompress=False,  # bytes pass through as the application wrote them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self.server.connection_made(self, transport)
        self._task_handler = asyncio.get_running_loop().create_task(self._live())
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:  # h2 has queued its GOAWAY with the reason
            self._flush()
            self.transport.close()
            return
        for event in events:
            self._on_event(event)
        self._flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._writable.set()
        if not self._lost.done():
            self._lost.set_result(None)
        self.server.connection_lost(self, exc)

    # web.Server's connection interface

    def close(self) -> None:
        """Take no new streams (GOAWAY naming the last one taken); close once those in flight are done."""
        if self.going_away or self.transport is None or self.transport.is_closing():
            return
        self.going_away = True
        # Written by hand: h2's close_connection() would stop the streams still in flight from sending.
        goaway = GoAwayFrame(0)
        goaway.last_stream_id, goaway.error_code = self.h2.highest_inbound_stream_id, ErrorCodes.NO_ERROR
        self._flush()
        self.transport.write(goaway.serialize())
        if not self.streams:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        self.close()
        in_flight = [stream.task for stream in self.streams.values() if stream.task is not None]
        if in_flight:
            await asyncio.wait(in_flight, timeout=timeout)
        if self.transport is not None:
            self.transport.close()
        if self._task_handler is not None:
            await asyncio.shield(self._task_handler)

    # the connection's life

    async def _live(self) -> None:
        """Waits for the transport to close, then ends the streams still going and the upstream session."""
        try:
            await self._lost
        finally:
            tasks = [stream.task for stream in self.streams.values() if stream.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._upstream.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.close) if not self.streams else None

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.going_away:  # after our GOAWAY: the client may safely retry it elsewhere
                self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            stream = InboundStream(event.stream_id, event.headers)
            self.streams[stream.id] = stream
            stream.request_ended = event.stream_ended is not None
            stream.task = asyncio.get_running_loop().create_task(self._serve(stream))
            self._arm_idle_timer()
        elif isinstance(event, h2.events.DataReceived):
            padding = event.flow_controlled_length - len(event.data)
            stream = self.streams.get(event.stream_id)
            if stream is None:  # its answer is done: the rest is not read
                self._acknowledge(event.flow_controlled_length, event.stream_id)
                return
            if padding:
                self._acknowledge(padding, event.stream_id)
            if event.data:
                stream.received += len(event.data)
                stream.unacknowledged += len(event.data)
                stream.body.put_nowait(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None and not stream.request_ended:
                stream.request_ended = True
                stream.body.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None and stream.task is not None:
                stream.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                if getattr(event, "stream_id", 0) in (0, stream.id):
                    stream.window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: h2 sends nothing after it, so what is in flight cannot be answered.
            self.transport.close()

    # one stream

    async def _serve(self, stream: InboundStream) -> None:
        answered = False
        try:
            answered = await self._forward(stream)
        except (asyncio.CancelledError, ConnectionResetError, h2.exceptions.ProtocolError):
            pass  # reset by the client, or the connection is going
        except Exception:  # noqa: BLE001 - one stream's fault is reset, never the connection's
            log.exception("e2b.h2c_stream_failed", stream=stream.id)
        finally:
            self.streams.pop(stream.id, None)
            if stream.unacknowledged:  # never forwarded: the connection's window gets it back
                self._acknowledge(stream.unacknowledged, stream.id)
            # After a whole answer, NO_ERROR tells a client still sending its body that it may stop; one whose body
            # is all here only has its END_STREAM to send (a reset would fail that send in some clients: httpcore).
            if not answered or not (stream.request_ended or stream.received == declared_length(stream.headers)):
                try:
                    self.h2.reset_stream(stream.id, ErrorCodes.NO_ERROR if answered else ErrorCodes.CANCEL)
                except h2.exceptions.ProtocolError:
                    pass  # closed both ways already, reset by the client, or the connection is closed
            if not self.transport.is_closing():
                self._flush()
                if self.going_away and not self.streams:
                    self.transport.close()
                self._arm_idle_timer()

    async def _forward(self, stream: InboundStream) -> bool:
        """The stream's request through the application; True once its whole answer is sent."""
        try:
            method, target, headers = upstream_request(stream.headers)
        except UpstreamRequestError as error:
            await self._answer(stream, 400, str(error).encode())
            return True
        body = None if stream.request_ended and stream.body.empty() else self._request_body(stream)
        headers_sent = False
        try:
            async with self._upstream.request(
                method, URL("http://h2c" + target, encoded=True), headers=headers, data=body, allow_redirects=False
            ) as response:
                self.h2.send_headers(stream.id, response_headers(response))
                headers_sent = True
                self._flush()
                async for chunk in response.content.iter_any():
                    await self._send(stream, chunk)
        except aiohttp.ClientError as error:
            if headers_sent:
                return False  # cut mid-answer (the gateway stopping): the reset tells the client
            await self._answer(stream, 502, f"the door's application did not answer: {error}".encode())
            return True
        self.h2.end_stream(stream.id)
        return True

    async def _request_body(self, stream: InboundStream):
        while (chunk := await stream.body.get()) is not None:
            yield chunk
            # aiohttp resumes us once the chunk is written upstream: now the client may send as much again.
            stream.unacknowledged -= len(chunk)
            self._acknowledge(len(chunk), stream.id)
            self._flush()

    def _acknowledge(self, size: int, stream_id: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # the client's GOAWAY closed the connection: no window to give back

    async def _answer(self, stream: InboundStream, status: int, text: bytes) -> None:
        headers = [(b":status", str(status).encode()), (b"content-type", b"text/plain; charset=utf-8")]
        self.h2.send_headers(stream.id, [*headers, (b"content-length", str(len(text)).encode())])
        await self._send(stream, text)
        self.h2.end_stream(stream.id)

    async def _send(self, stream: InboundStream, data: bytes) -> None:
        """DATA frames for `data`, as the client's windows open and the socket drains."""
        while data:
            window = self.h2.local_flow_control_window(stream.id)
            if window <= 0:
                stream.window_open.clear()
                await stream.window_open.wait()
                continue
            now, data = data[:window], data[window:]
            frame_size = self.h2.max_outbound_frame_size
            for start in range(0, len(now), frame_size):
                self.h2.send_data(stream.id, now[start : start + frame_size])
            self._flush()
            await self._writable.wait()
            if self.transport.is_closing():
                raise ConnectionResetError
