"""The Connect protocol (https://connectrpc.com/docs/protocol) on aiohttp, as the E2B SDKs speak it to envd.

Why not PyPI `connectrpc` (0.12.1, installed as an E2B SDK dependency): its server is an ASGI/WSGI application
whose codecs are bound to protobuf-py messages (the `protobuf` module), while the gateway is aiohttp and our
messages are google.protobuf (`gen/python/e2b_envd`, compiled by `make protos`). Wrapping it would mean an ASGI
bridge inside aiohttp and a second protobuf runtime for every message we translate. What envd needs of the
protocol is small and fixed: unary (`application/proto`, `application/json`), server and client streaming
(`application/connect+proto`, `application/connect+json`: 5-byte envelopes, the last one flagged 0x02 and carrying
`{"error": ..., "metadata": ...}`), gzip on the way in (aiohttp inflates a unary body; stream envelopes are ours),
the `Connect-Timeout-Ms` deadline and Connect's error JSON with its HTTP status for unary calls. That is this module.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

ENVELOPE_HEADER = struct.Struct(">BI")
FLAG_COMPRESSED, FLAG_END_STREAM = 0x01, 0x02
MAX_MESSAGE_BYTES = 16 << 20  # a Connect message bigger than this is refused (resource_exhausted)

# Connect's codes and the HTTP status a unary error answers with (the protocol's table).
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class ConnectError(Exception):
    """An RPC error in Connect's terms: a code of HTTP_STATUS and a message for the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    @classmethod
    def from_grpc(cls, error: grpc.aio.AioRpcError) -> ConnectError:
        """Our gRPC API's status, said in Connect's words (the codes are the same set, spelled in lower case)."""
        code = error.code().name.lower() if error.code() else "unknown"
        return cls(code if code in HTTP_STATUS else "unknown", error.details() or code)

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Method:
    """One RPC: its message types and how it streams ("unary", "server" or "client")."""

    request_type: type[Message]
    response_type: type[Message]
    kind: str
    handler: Callable[..., Any]


@dataclass(frozen=True)
class Codec:
    name: str  # "proto" or "json"

    def decode(self, data: bytes, message_type: type[Message]) -> Message:
        message = message_type()
        try:
            if self.name == "proto":
                message.ParseFromString(data)
            else:
                json_format.Parse(data.decode() if data else "{}", message, ignore_unknown_fields=True)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, RecursionError) as error:
            raise ConnectError(
                "invalid_argument", f"the request is not a valid {message_type.__name__}: {error}"
            ) from None
        return message

    def encode(self, message: Message) -> bytes:
        if self.name == "proto":
            return message.SerializeToString()
        return json_format.MessageToJson(message, indent=None).encode()


@dataclass
class ConnectRequest:
    """A parsed Connect call: its codec, whether it streams, its deadline (seconds, or None) and its headers."""

    http: web.Request
    codec: Codec
    streaming: bool
    timeout: float | None
    compressed: bool

    @property
    def headers(self):
        return self.http.headers


def parse_request(request: web.Request, method: Method) -> ConnectRequest:
    """The codec and framing from the content type; a mismatch is the caller's mistake (415, or the error JSON)."""
    content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    streaming = method.kind != "unary"
    prefix = "application/connect+" if streaming else "application/"
    if not content_type.startswith(prefix) or content_type[len(prefix) :] not in ("proto", "json"):
        expected = f"{prefix}proto or {prefix}json"
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"code": "invalid_argument", "message": f"content type must be {expected}"}),
            content_type="application/json",
        )
    # A unary body's Content-Encoding (the SDK's connectrpc declares gzip) is undone by aiohttp before we read it;
    # a stream's Connect-Content-Encoding applies to each envelope flagged compressed, which is ours to inflate.
    encoding = request.headers.get("Connect-Content-Encoding", "identity").strip().lower() if streaming else "identity"
    if encoding not in ("identity", "gzip"):
        raise ConnectError("unimplemented", f"Connect-Content-Encoding {encoding!r} is not supported (identity, gzip)")
    timeout = None
    if raw := request.headers.get("Connect-Timeout-Ms"):
        if not raw.isdigit() or len(raw) > 10:
            raise ConnectError("invalid_argument", f"Connect-Timeout-Ms {raw!r} is not a number of milliseconds")
        timeout = int(raw) / 1000 if int(raw) > 0 else None
    return ConnectRequest(request, Codec(content_type[len(prefix) :]), streaming, timeout, encoding == "gzip")


def _inflate(data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise ConnectError("invalid_argument", f"the request is not valid gzip: {error}") from None


async def read_unary(call: ConnectRequest, message_type: type[Message]) -> Message:
    if call.http.content_length is not None and call.http.content_length > MAX_MESSAGE_BYTES:
        raise ConnectError("resource_exhausted", f"the request is over {MAX_MESSAGE_BYTES} bytes")
    body = await call.http.content.read(MAX_MESSAGE_BYTES + 1)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ConnectError("resource_exhausted", f"the request is over {MAX_MESSAGE_BYTES} bytes")
    return call.codec.decode(body, message_type)


async def read_envelopes(call: ConnectRequest, message_type: type[Message]) -> AsyncIterator[Message]:
    """The messages of a streaming request body, in order, as they arrive (a client stream is read live)."""
    content = call.http.content
    while True:
        try:
            header = await content.readexactly(ENVELOPE_HEADER.size)
        except asyncio.IncompleteReadError as error:
            if error.partial:
                raise ConnectError("invalid_argument", "the request ends inside an envelope header") from None
            return
        flags, length = ENVELOPE_HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise ConnectError("resource_exhausted", f"a request message is over {MAX_MESSAGE_BYTES} bytes")
        try:
            data = await content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectError("invalid_argument", "the request ends inside a message") from None
        if flags & FLAG_END_STREAM:
            return
        if flags & FLAG_COMPRESSED:
            if not call.compressed:
                raise ConnectError("invalid_argument", "a compressed message without Connect-Content-Encoding")
            data = _inflate(data)
        yield call.codec.decode(data, message_type)


async def read_single_envelope(call: ConnectRequest, message_type: type[Message]) -> Message:
    """The one request message of a server-streaming call."""
    messages = [message async for message in read_envelopes(call, message_type)]
    if len(messages) != 1:
        raise ConnectError("invalid_argument", f"a server-streaming call takes one message, not {len(messages)}")
    return messages[0]


def envelope(data: bytes, flags: int = 0) -> bytes:
    return ENVELOPE_HEADER.pack(flags, len(data)) + data


def error_response(error: ConnectError) -> web.Response:
    """A unary call's error: Connect's error JSON with the code's HTTP status."""
    return web.json_response(error.as_json(), status=HTTP_STATUS.get(error.code, 500))


async def serve_unary(
    call: ConnectRequest, method: Method, run: Callable[[Message, ConnectRequest], Awaitable[Message]]
) -> web.Response:
    try:
        message = await read_unary(call, method.request_type)
        try:
            reply = await asyncio.wait_for(run(message, call), call.timeout)  # Connect-Timeout-Ms bounds the call
        except TimeoutError:
            raise ConnectError("deadline_exceeded", f"the call took longer than its {call.timeout} s") from None
    except ConnectError as error:
        return error_response(error)
    except grpc.aio.AioRpcError as error:
        return error_response(ConnectError.from_grpc(error))
    return web.Response(body=call.codec.encode(reply), content_type=f"application/{call.codec.name}")


async def serve_stream(
    call: ConnectRequest, method: Method, replies: Callable[[ConnectRequest], AsyncIterator[Message]]
) -> web.StreamResponse:
    """A streaming call: each reply in its envelope as it comes, then the end-of-stream envelope (with the error,
    if one ended it). An error before the first reply still answers 200: in Connect streams the status is in the
    last envelope."""
    response = web.StreamResponse(status=200, headers={"Content-Type": f"application/connect+{call.codec.name}"})
    end: dict[str, Any] = {}
    stream = replies(call)
    try:
        async for reply in stream:
            if not response.prepared:
                await response.prepare(call.http)
            await response.write(envelope(call.codec.encode(reply)))
    except ConnectError as error:
        end["error"] = error.as_json()
    except grpc.aio.AioRpcError as error:
        end["error"] = ConnectError.from_grpc(error).as_json()
    except ConnectionResetError:  # the caller went away (the SDK closes a stream it is done with): nobody to tell
        return response
    finally:
        await stream.aclose()
    try:
        if not response.prepared:
            await response.prepare(call.http)
        await response.write(envelope(json.dumps(end).encode(), FLAG_END_STREAM))
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response
