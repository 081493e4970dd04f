"""h2c on the gateway's E2B doors (services/gateway/e2b/http2.py): HTTP/2 with prior knowledge beside HTTP/1.1 on
the same port. Against a real in-process installation (fake VMM): the control plane and envd's Connect calls in both
codecs over httpx's h2, e2b's own connectrpc clients over pyqwest's (hyper's) h2, `/files` of several MiB both ways
(flow control), streams sharing a connection, a client's RST_STREAM, HTTP/1.1 still served. Against a small
application on a DoorSite of its own: what only the server side can see (a reset cancels the handler, shutdown's
GOAWAY lets streams in flight finish, an idle connection is closed)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import hpack
import httpx
import pytest
from aiohttp import web
from e2b_envd import filesystem_pb2 as fs
from e2b_envd import process_pb2 as proc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from services.gateway.e2b import http2
from services.gateway.e2b.connect_protocol import FLAG_END_STREAM, envelope
from tests.unit.e2b_fixtures import envelopes

pytestmark = pytest.mark.timeout(120)
PROTO, JSON = {"Content-Type": "application/proto"}, {"Content-Type": "application/json"}
STREAM_PROTO, STREAM_JSON = {"Content-Type": "application/connect+proto"}, {"Content-Type": "application/connect+json"}


@pytest.fixture(scope="module")
async def sandbox(doors):
    """A sandbox of alice, made over HTTP/1.1, and the headers that reach its envd on the traffic door."""
    status, body = await doors.call(
        "POST", "/v2/sandboxes", json={"templateID": "base", "timeout": 600, "envVars": {"HOME": "/tmp"}}
    )
    assert status == 201, body
    envd = {"E2b-Sandbox-Id": body["sandboxID"], "E2b-Sandbox-Port": "49983", "X-Access-Token": body["envdAccessToken"]}
    yield body["sandboxID"], envd
    await doors.call("DELETE", f"/sandboxes/{body['sandboxID']}")


@pytest.fixture
async def h2c():
    async with httpx.AsyncClient(http1=False, http2=True, timeout=60) as client:
        yield client


async def test_the_control_plane_over_h2_creates_gets_and_kills_a_sandbox(doors, h2c):
    key = {"X-API-Key": doors.alice.key}
    created = await h2c.post(doors.api + "/v2/sandboxes", headers=key, json={"templateID": "base", "timeout": 60})
    assert (created.http_version, created.status_code) == ("HTTP/2", 201), created.text
    sandbox = created.json()["sandboxID"]
    got = await h2c.get(f"{doors.api}/sandboxes/{sandbox}", headers=key)
    assert got.status_code == 200 and got.json()["sandboxID"] == sandbox
    missing = await h2c.get(f"{doors.api}/sandboxes/sbx-nosuchsandbox", headers=key)
    assert missing.status_code == 404 and missing.json() == {"code": 404, "message": missing.json()["message"]}
    assert (await h2c.delete(f"{doors.api}/sandboxes/{sandbox}", headers=key)).status_code == 204
    assert (await h2c.get(f"{doors.api}/sandboxes/{sandbox}", headers=key)).status_code == 404


async def test_connect_unary_calls_over_h2_in_both_codecs(doors, h2c, sandbox):
    _, envd = sandbox
    url = doors.sandbox + "/filesystem.Filesystem/"
    stat = await h2c.post(url + "Stat", content=fs.StatRequest(path="/tmp").SerializeToString(), headers=envd | PROTO)
    assert (stat.http_version, stat.status_code, stat.headers["content-type"]) == ("HTTP/2", 200, "application/proto")
    assert fs.StatResponse.FromString(stat.content).entry.name == "tmp"
    listed = await h2c.post(url + "ListDir", json={"path": "/", "depth": 1}, headers=envd | JSON)
    assert listed.status_code == 200 and "tmp" in [entry["name"] for entry in listed.json()["entries"]]
    missing = await h2c.post(url + "Stat", json={"path": "/no/such/file"}, headers=envd | JSON)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_a_server_streaming_call_over_h2_in_both_codecs(doors, h2c, sandbox):
    _, envd = sandbox
    url = doors.sandbox + "/process.Process/Start"
    request = proc.StartRequest(process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", "echo hi; exit 3"]))
    binary = await h2c.post(url, content=envelope(request.SerializeToString()), headers=envd | STREAM_PROTO)
    assert (binary.http_version, binary.headers["content-type"]) == ("HTTP/2", "application/connect+proto")
    frames = envelopes(binary.content)
    events = [proc.StartResponse.FromString(data).event for _, data in frames[:-1]]
    assert events[0].start.pid > 0 and b"".join(event.data.stdout for event in events) == b"hi\n"
    assert events[-1].end.exit_code == 3 and frames[-1] == (FLAG_END_STREAM, b"{}")
    start = {"process": {"cmd": "/bin/sh", "args": ["-c", "echo json"]}}
    text = await h2c.post(url, content=envelope(json.dumps(start).encode()), headers=envd | STREAM_JSON)
    replies = [json.loads(data) for _, data in envelopes(text.content)]
    assert [reply["event"]["data"]["stdout"] for reply in replies if "data" in reply.get("event", {})] == ["anNvbgo="]
    assert replies[-1] == {} and "end" in replies[-2]["event"]


async def test_e2b_connectrpc_clients_speak_h2c_through_pyqwest(doors, sandbox):
    from e2b.envd.filesystem import filesystem_pb
    from e2b.envd.filesystem.filesystem_connect import FilesystemClient
    from e2b.envd.process import process_pb
    from e2b.envd.process.process_connect import ProcessClient
    from pyqwest import Client, Headers, HTTPTransport, HTTPVersion, Request

    _, envd = sandbox
    async with HTTPTransport(http_version=HTTPVersion.HTTP2) as transport:  # hyper's h2c: prior knowledge
        probe = await transport.execute(Request("GET", doors.sandbox + "/health", headers=Headers(envd)))
        assert (probe.http_version, probe.status) == (HTTPVersion.HTTP2, 204)
        await probe.aclose()
        http = Client(transport)
        filesystem = FilesystemClient(doors.sandbox, http_client=http)
        stat = await filesystem.stat(filesystem_pb.StatRequest(path="/tmp"), headers=envd)
        assert stat.entry.name == "tmp"
        processes = ProcessClient(doors.sandbox, http_client=http)
        config = process_pb.ProcessConfig(cmd="/bin/sh", args=["-c", "echo from-hyper"])
        output = b""
        async for reply in processes.start(process_pb.StartRequest(process=config), headers=envd):
            event = reply.event.event  # protobuf-py: a oneof is a (field, value)
            if event.field == "data" and event.value.output.field == "stdout":
                output += event.value.output.value
        assert output == b"from-hyper\n"


async def test_files_of_several_mib_go_up_and_down_over_h2(doors, h2c, sandbox):
    _, envd = sandbox
    path = f"/tmp/e2b-h2-{uuid.uuid4().hex[:8]}.bin"
    data = os.urandom(12 << 20)  # 12 MiB: far past both h2 windows, so only flow control lets it through
    octets = {"Content-Type": "application/octet-stream"}
    uploaded = await h2c.post(f"{doors.sandbox}/files", params={"path": path}, content=data, headers=envd | octets)
    assert (uploaded.http_version, uploaded.status_code) == ("HTTP/2", 200), uploaded.text

    async def pieces():  # a body of unknown length: forwarded chunked
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    again = await h2c.post(
        f"{doors.sandbox}/files", params={"path": path + ".2"}, content=pieces(), headers=envd | octets
    )
    assert again.status_code == 200, again.text
    try:
        for name in (path, path + ".2"):
            async with h2c.stream("GET", f"{doors.sandbox}/files", params={"path": name}, headers=envd) as download:
                assert download.status_code == 200
                assert b"".join([chunk async for chunk in download.aiter_bytes()]) == data
    finally:
        for name in (path, path + ".2"):
            await h2c.post(doors.sandbox + "/filesystem.Filesystem/Remove", json={"path": name}, headers=envd | JSON)


async def test_concurrent_streams_share_one_connection(doors, h2c, sandbox):
    _, envd = sandbox
    await h2c.post(doors.sandbox + "/filesystem.Filesystem/Stat", json={"path": "/"}, headers=envd | JSON)

    async def echo(n: int) -> httpx.Response:
        start = proc.StartRequest(process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", f"sleep 0.2; echo {n}"]))
        return await h2c.post(
            doors.sandbox + "/process.Process/Start",
            content=envelope(start.SerializeToString()),
            headers=envd | STREAM_PROTO,
        )

    async def stat(n: int) -> httpx.Response:
        return await h2c.post(doors.sandbox + "/filesystem.Filesystem/Stat", json={"path": "/tmp"}, headers=envd | JSON)

    replies = await asyncio.gather(*[echo(n) for n in range(8)], *[stat(n) for n in range(8)])
    for n, reply in enumerate(replies[:8]):
        events = [proc.StartResponse.FromString(data).event for _, data in envelopes(reply.content)[:-1]]
        assert b"".join(event.data.stdout for event in events) == f"{n}\n".encode()
    assert all(reply.json()["entry"]["name"] == "tmp" for reply in replies[8:])
    assert len({id(reply.extensions["network_stream"]) for reply in replies}) == 1


async def test_http1_clients_are_still_served_on_the_same_port(doors, h2c, sandbox):
    _, envd = sandbox
    over_h2 = await h2c.get(doors.api + "/v2/sandboxes", headers={"X-API-Key": doors.alice.key})
    status, listed = await doors.call("GET", "/v2/sandboxes")  # aiohttp's client: HTTP/1.1
    assert over_h2.status_code == status == 200 and over_h2.json() == listed
    # Methods that start as the preface does ("P") are HTTP/1.1 as soon as a byte differs.
    for verb in ("POST", "PUT", "PATCH"):
        async with doors.http.request(verb, doors.sandbox + "/filesystem.Filesystem/Stat", headers=envd) as response:
            answer = await response.json()  # envd's refusal (no content type, no such method), in Connect's words
            assert response.version == (1, 1) and response.status in (415, 501) and answer["code"], verb
    async with httpx.AsyncClient() as http1:
        answer = await http1.post(doors.sandbox + "/filesystem.Filesystem/Stat", json={"path": "/"}, headers=envd)
        assert answer.http_version == "HTTP/1.1" and answer.json()["entry"]["path"] == "/"


# A raw client: h2 to send, frames read one by one, so what follows a reset or a GOAWAY is seen as it is sent.


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.headers = hpack.Decoder()
        self.h2.initiate_connection()
        self.writer.write(self.h2.data_to_send())

    @classmethod
    async def to(cls, url: str) -> RawClient:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    def request(self, method: str, path: str, headers: dict | list, body: bytes = b"", authority="127.0.0.1") -> int:
        stream = self.h2.get_next_available_stream_id()
        pseudo = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]
        pairs = headers.items() if isinstance(headers, dict) else headers
        self.h2.send_headers(stream, pseudo + [(k.lower(), v) for k, v in pairs], end_stream=not body)
        for start in range(0, len(body), 16384):  # h2's frame size (the window is the client's first: 64 KiB)
            self.h2.send_data(stream, body[start : start + 16384], end_stream=start + 16384 >= len(body))
        self.writer.write(self.h2.data_to_send())
        return stream

    def reset(self, stream: int) -> None:
        self.h2.reset_stream(stream, ErrorCodes.CANCEL)
        self.writer.write(self.h2.data_to_send())

    async def frame(self) -> Frame | None:
        """The next frame the server sends (HEADERS decoded into `.decoded`), or None at the end of the connection."""
        try:
            frame, length = Frame.parse_frame_header(memoryview(await self.reader.readexactly(9)))
            frame.parse_body(memoryview(await self.reader.readexactly(length)))
        except asyncio.IncompleteReadError:
            return None
        if isinstance(frame, HeadersFrame):
            frame.decoded = dict(self.headers.decode(frame.data, raw=True))
        return frame

    async def frame_of(self, stream: int, kind: type[Frame]) -> Frame:
        while not isinstance(frame := await self.frame(), kind) or frame.stream_id != stream:
            assert frame is not None, f"the connection ended before a {kind.__name__} on stream {stream}"
        return frame

    async def response(self, stream: int) -> tuple[bytes, bytes]:
        """The status and whole body of `stream`."""
        status, body = (await self.frame_of(stream, HeadersFrame)).decoded[b":status"], b""
        while "END_STREAM" not in (frame := await self.frame_of(stream, DataFrame)).flags:
            body += frame.data
        return status, body + frame.data

    def close(self) -> None:
        self.writer.close()


async def test_a_client_reset_of_a_process_stream_leaves_the_connection_serving(doors, sandbox):
    _, envd = sandbox
    client = await RawClient.to(doors.sandbox)
    try:
        loop = proc.StartRequest(
            process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", "while :; do echo tick; sleep 0.05; done"]), tag="h2"
        )
        body = envelope(loop.SerializeToString())
        ticking = client.request("POST", "/process.Process/Start", envd | STREAM_PROTO, body)
        await client.frame_of(ticking, DataFrame)  # it runs
        client.reset(ticking)
        kill = {"process": {"tag": "h2"}, "signal": "SIGNAL_SIGKILL"}
        killed = client.request("POST", "/process.Process/SendSignal", envd | JSON, json.dumps(kill).encode())
        assert (await client.frame_of(killed, HeadersFrame)).decoded[b":status"] == b"200"
    finally:
        client.close()


# A small application of its own on a DoorSite: what the server side does.


@pytest.fixture
async def small_door():
    """A DoorSite serving `/ticks` (a stream that records how it ended), `/held` (answers when released) and `/echo`
    (what the application saw of a request)."""
    ended: asyncio.Future = asyncio.get_running_loop().create_future()
    entered, release = asyncio.Event(), asyncio.Event()

    async def ticks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"tick\n")
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            ended.set_result("cancelled")
            raise

    async def held(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="released")

    app = web.Application()
    app.router.add_get("/ticks", ticks)

    async def echo(request: web.Request) -> web.Response:
        seen = {name: request.headers.get(name) for name in ("Host", "Cookie", "TE", "X-Probe", "Transfer-Encoding")}
        return web.json_response({"version": list(request.version), "body": len(await request.read()), **seen})

    app.router.add_get("/held", held)
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await http2.DoorSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield runner, f"http://{host}:{port}", ended, entered, release
    if runner.server is not None:  # not cleaned up by the test
        await runner.cleanup()


async def test_a_reset_cancels_the_handler_and_its_upstream_connection(small_door):
    runner, url, ended, _, _ = small_door
    client = await RawClient.to(url)
    try:
        stream = client.request("GET", "/ticks", {})
        await client.frame_of(stream, DataFrame)
        assert len(runner.server.connections) == 2  # the h2c connection and its forwarded request's
        client.reset(stream)
        assert await ended == "cancelled"
        while len(runner.server.connections) > 1:  # the forwarded request's connection closes with it
            await asyncio.sleep(0.01)
        assert [type(connection) for connection in runner.server.connections] == [http2.H2cConnection]
    finally:
        client.close()


async def test_a_stream_reaches_the_application_as_an_http1_request(small_door):
    _, url, _, _, _ = small_door
    client = await RawClient.to(url)
    try:
        headers = [("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers"), ("x-probe", "p")]
        seen = client.request("POST", "/echo", headers, b"x" * 60000, authority="8000-sbx-1.e2b.example.test")
        status, body = await client.response(seen)
        assert status == b"200" and json.loads(body) == {
            "version": [1, 1],
            "body": 60000,  # in four DATA frames
            "Host": "8000-sbx-1.e2b.example.test",  # E2B's domain form reads the sandbox from it
            "Cookie": "a=1; b=2",  # h2 splits a Cookie, HTTP/1.1 has one
            "TE": None,
            "X-Probe": "p",
            "Transfer-Encoding": "chunked",  # no content-length: streamed
        }
        bad = client.request("GET", "/echo", [("x-probe", b"\xff")])
        assert (await client.response(bad))[0] == b"400"
        assert (await client.response(client.request("GET", "/echo", {})))[0] == b"200"  # the connection goes on
    finally:
        client.close()


async def test_shutdown_sends_goaway_and_lets_a_stream_in_flight_finish(small_door):
    runner, url, _, entered, release = small_door
    client = await RawClient.to(url)
    try:
        held = client.request("GET", "/held", {})
        await entered.wait()
        cleanup = asyncio.create_task(runner.cleanup())
        goaway = await client.frame_of(0, GoAwayFrame)
        assert (goaway.last_stream_id, goaway.error_code) == (held, 0)
        late = client.request("GET", "/held", {})  # sent before the client could read the GOAWAY
        assert (await client.frame_of(late, RstStreamFrame)).error_code == ErrorCodes.REFUSED_STREAM
        release.set()
        assert (await client.frame_of(held, HeadersFrame)).decoded[b":status"] == b"200"
        assert (await client.frame_of(held, DataFrame)).data == b"released"
        while await client.frame() is not None:  # then the server closes the connection
            pass
        await cleanup
        assert runner.server is None
    finally:
        client.close()


async def test_an_idle_connection_is_closed_with_a_goaway(small_door, monkeypatch):
    _, url, _, _, _ = small_door
    monkeypatch.setattr(http2, "IDLE_SECONDS", 0.05)
    client = await RawClient.to(url)
    try:
        goaway = await client.frame_of(0, GoAwayFrame)
        assert (goaway.last_stream_id, goaway.error_code) == (0, 0)
        assert await client.frame() is None
    finally:
        client.close()
