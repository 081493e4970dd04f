"""WebSocket upgrades through the E2B traffic door to a guest port (services/gateway/e2b/guest_upgrade.py), against an
in-process installation (fake VMM: a server on this host's 127.0.0.1 is on every sandbox's loopback): a WebSocket
server "in the guest" reached by the door's headers and, through deploy/e2b/nginx.conf, by the domain form; messages
both ways, the subprotocol, closes from either side, refusals, and answers other than a switch."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil

import aiohttp
import pytest
from aiohttp import web
from e2b import AsyncSandbox

from tests.etcd import free_port
from tests.unit.test_e2b_deploy import DOMAIN, proxy  # noqa: F401 - `proxy` is the fixture of nginx.conf's tests

pytestmark = pytest.mark.timeout(120)


class GuestServer:
    """An aiohttp server on the guests' loopback: a WebSocket echo and two refusals of an upgrade."""

    def __init__(self) -> None:
        self.port = 0
        self.closes: asyncio.Queue[int | None] = asyncio.Queue()  # each echo socket's close code, as it ends

    async def echo(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(protocols=("superchat",), max_msg_size=8 << 20)
        await socket.prepare(request)
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT and message.data == "close, please":
                await socket.close(code=4001, message=b"asked to")
            elif message.type == aiohttp.WSMsgType.TEXT and message.data == "drop, please":
                request.transport.close()  # no close frame: the connection just ends
            elif message.type == aiohttp.WSMsgType.TEXT:
                await socket.send_str(f"guest heard {message.data}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        await self.closes.put(socket.close_code)
        return socket

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no WebSocket here", headers={"X-Served-By": "guest"})

    async def refuse_in_chunks(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=426, headers={"Upgrade": "websocket"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"upgrade ", b"to something ", b"else" * 5000):
            await response.write(part)
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
async def guest():
    server = GuestServer()
    app = web.Application()
    app.router.add_get("/echo", server.echo)
    app.router.add_get("/refuse", server.refuse)
    app.router.add_get("/refuse-in-chunks", server.refuse_in_chunks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.port = runner.addresses[0][1]
    yield server
    await runner.cleanup()


@pytest.fixture(scope="module")
async def sandboxes(doors):
    """Two sandboxes of alice, each with its access token."""
    made = [await AsyncSandbox.create("base", timeout=600) for _ in range(2)]
    yield [(s.sandbox_id, s.connection_config.sandbox_headers["X-Access-Token"]) for s in made]
    for sandbox in made:
        await sandbox.kill()


def door_headers(sandbox: str, port: int, token: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox, "E2b-Sandbox-Port": str(port), "X-Access-Token": token}


def upgrade_headers() -> dict[str, str]:
    """A WebSocket upgrade request's own headers, for requests made without aiohttp's ws_connect."""
    key = base64.b64encode(os.urandom(16)).decode()
    return {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}


async def no_splice_left() -> None:
    """Waits until the door holds no splice task (the installation serves from this event loop)."""
    while any(task.get_name().startswith("e2b-upgrade") for task in asyncio.all_tasks()):
        await asyncio.sleep(0.02)


async def test_text_and_binary_messages_cross_both_ways_with_the_subprotocol(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    async with doors.http.ws_connect(
        doors.sandbox + "/echo", headers=door_headers(sandbox, guest.port, token), protocols=("chat", "superchat")
    ) as socket:
        assert socket.protocol == "superchat"  # the guest server's choice among the client's
        await socket.send_str("hello")
        assert await socket.receive_str() == "guest heard hello"
        await socket.send_bytes(b"\x00\x01\xfe\xff")
        assert await socket.receive_bytes() == b"\xff\xfe\x01\x00"
        await socket.close()
    assert await guest.closes.get() == aiohttp.WSCloseCode.OK


async def test_a_mebibyte_message_crosses_both_ways(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    payload = os.urandom(1 << 20)  # incompressible: the permessage-deflate both ends agree on cannot shrink it
    async with doors.http.ws_connect(
        doors.sandbox + "/echo", headers=door_headers(sandbox, guest.port, token), max_msg_size=8 << 20
    ) as socket:
        for _ in range(3):
            await socket.send_bytes(payload)
            assert await socket.receive_bytes() == payload[::-1]
    assert await guest.closes.get() == aiohttp.WSCloseCode.OK


async def test_the_guest_closing_ends_the_clients_websocket(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    async with doors.http.ws_connect(doors.sandbox + "/echo", headers=door_headers(sandbox, guest.port, token)) as ws:
        await ws.send_str("close, please")
        message = await ws.receive()
        assert (message.type, message.data, message.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "asked to")
    assert await guest.closes.get() == aiohttp.WSCloseCode.OK  # the client's answer to the close came back
    await no_splice_left()


async def test_the_guest_dropping_its_connection_drops_the_clients(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    async with doors.http.ws_connect(doors.sandbox + "/echo", headers=door_headers(sandbox, guest.port, token)) as ws:
        await ws.send_str("drop, please")
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE  # no close frame came: the connection ended
    await guest.closes.get()
    await no_splice_left()


async def test_the_client_closing_ends_the_guests_websocket(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    async with doors.http.ws_connect(doors.sandbox + "/echo", headers=door_headers(sandbox, guest.port, token)) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str() == "guest heard hello"
        await ws.close(code=4002, message=b"bye")
    assert await guest.closes.get() == 4002
    await no_splice_left()


async def test_the_client_dropping_its_connection_drops_the_guests(doors, sandboxes, guest):
    """A client gone without a close frame: the door cancels the call, which closes the guest's connection."""
    sandbox, token = sandboxes[0]
    host, port = doors.sandbox.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    headers = {"Host": f"{host}:{port}", **door_headers(sandbox, guest.port, token), **upgrade_headers()}
    writer.write(("GET /echo HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.close()
    await writer.wait_closed()
    assert await guest.closes.get() == aiohttp.WSCloseCode.ABNORMAL_CLOSURE
    await no_splice_left()


async def test_nothing_listening_is_502_in_e2b_shape(doors, sandboxes):
    sandbox, token = sandboxes[0]
    headers = {**door_headers(sandbox, free_port(), token), **upgrade_headers()}
    async with doors.http.get(doors.sandbox + "/websockify", headers=headers) as response:
        assert response.status == 502
        answer = json.loads(await response.text())
    assert answer["code"] == 502 and "nothing listens" in answer["message"]


async def test_an_answer_other_than_a_switch_is_passed_on(doors, sandboxes, guest):
    sandbox, token = sandboxes[0]
    headers = {**door_headers(sandbox, guest.port, token), **upgrade_headers()}
    async with doors.http.get(doors.sandbox + "/refuse", headers=headers) as response:
        assert (response.status, await response.text()) == (403, "no WebSocket here")
        assert response.headers["X-Served-By"] == "guest"
    async with doors.http.get(doors.sandbox + "/refuse-in-chunks", headers=headers) as response:
        assert (response.status, await response.text()) == (426, "upgrade to something " + "else" * 5000)
    # The same connection of the client goes on with plain HTTP afterwards.
    async with doors.http.get(doors.sandbox + "/refuse", headers=door_headers(sandbox, guest.port, token)) as again:
        assert again.status == 403


async def test_the_credential_is_checked_as_for_plain_http(doors, sandboxes, guest):
    (first, first_token), (second, _) = sandboxes
    unauthenticated = {"E2b-Sandbox-Id": first, "E2b-Sandbox-Port": str(guest.port)}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await doors.http.ws_connect(doors.sandbox + "/echo", headers=unauthenticated)
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as elsewhere:  # a token is for its own sandbox only
        await doors.http.ws_connect(doors.sandbox + "/echo", headers=door_headers(second, guest.port, first_token))
    assert elsewhere.value.status == 404
    with_key = {**unauthenticated, "X-API-Key": doors.alice.key}
    async with doors.http.ws_connect(doors.sandbox + "/echo", headers=with_key) as socket:
        await socket.send_str("by key")
        assert await socket.receive_str() == "guest heard by key"
    assert await guest.closes.get() == aiohttp.WSCloseCode.OK


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_the_domain_form_upgrades_through_nginx(doors, sandboxes, guest, proxy):  # noqa: F811
    sandbox, token = sandboxes[0]
    headers = {"Host": f"{guest.port}-{sandbox}.{DOMAIN}", "X-Access-Token": token}
    url = proxy.replace("https://", "wss://", 1) + "/echo"
    async with doors.http.ws_connect(url, headers=headers, ssl=False, protocols=("superchat",)) as socket:
        assert socket.protocol == "superchat"
        await socket.send_str("through nginx")
        assert await socket.receive_str() == "guest heard through nginx"
        await socket.send_bytes(b"\x01\x02")
        assert await socket.receive_bytes() == b"\x02\x01"
    assert await guest.closes.get() == aiohttp.WSCloseCode.OK
