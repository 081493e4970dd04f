"""The two doors of the API fuzz (tests/unit/test_fuzz_api.py): a request of any public RPC sent over gRPC or in its
HTTP/JSON form (from the method's `google.api.http` annotation), and what came back, as an `Outcome` that compares
across calls."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.parse
from dataclasses import dataclass, replace

import aiohttp
import grpc
import yarl
from google.protobuf import json_format, message_factory, text_format

from services.common.errors import STATUS_BY_NUMBER, error_info
from tests.fuzz_requests import F, http_rule

CALL_TIMEOUT = 30.0
# Server streams that run until the caller cancels (a watch): read up to their first answer, then cancelled, as a
# client that got what it wanted does. Named, because nothing in a descriptor says a stream has no end.
# Streams that may go on until cancelled (GetSandboxMetrics with `follow`): the fuzz reads the first answer only.
OPEN_ENDED = {"WatchDir", "WatchEvents", "GetSandboxMetrics"}
OPEN_ENDED_PATHS = re.compile(r"((/files|/events):watch|/sandboxes/[^/]+/metrics)$")


@dataclass
class Outcome:
    """What a call answered, comparable across calls: `status` is the gRPC code name or the HTTP status."""

    status: str
    detail: str
    codes: tuple[str, ...] = ()  # every gRPC code seen (an HTTP error body's, a stream's last event's)

    @property
    def ok(self) -> bool:
        return self.status in ("OK", "200")

    def renamed(self, renames: dict[str, str]) -> Outcome:
        detail = self.detail
        for old, new in renames.items():
            detail = detail.replace(old, new)
        return replace(self, detail=detail)


def grpc_detail(error: grpc.RpcError) -> str:
    try:
        info = error_info(error)
    except ValueError as exc:  # a status whose details contradict its code
        return f"{error.details()} [details unreadable: {exc}]"
    described = f" [{info.reason} {sorted(info.metadata.items())}]" if info else ""
    return f"{error.details()}{described}"


def grpc_callable(channel, method, raw: bool = False):
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = ("stream_" if method.client_streaming else "unary_") + ("stream" if method.server_streaming else "unary")
    return getattr(channel, kind)(
        path,
        request_serializer=(lambda data: data) if raw else (lambda message: message.SerializeToString()),
        response_deserializer=(lambda data: data)
        if raw
        else message_factory.GetMessageClass(method.output_type).FromString,
    )


class Doors:
    """gRPC (asyncio; synchronous for client streams, see `call_grpc`) and HTTP/JSON clients of one gateway."""

    def __init__(self, grpc_address: str, http_base: str) -> None:
        self.channel = grpc.aio.insecure_channel(grpc_address)
        self.sync_channel = grpc.insecure_channel(grpc_address)
        self.http = http_base
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))

    async def call_grpc(self, method, request, metadata, raw: bool = False) -> Outcome:
        """One call (a client stream: `request` is its list of messages), what it answered."""
        try:
            if not method.client_streaming:
                call = grpc_callable(self.channel, method, raw)(request, metadata=metadata, timeout=CALL_TIMEOUT)
                if method.name in OPEN_ENDED:
                    responses = []
                    async for response in call:
                        responses.append(response)
                        break
                    call.cancel()
                else:
                    responses = [r async for r in call] if method.server_streaming else [await call]
            else:
                # grpc's asyncio client reports INTERNAL ("Internal error from Core") instead of the server's status
                # when the server ends a client stream while a write is in flight (grpc/grpc#36066); its synchronous
                # client reports what the server said.
                def stream():
                    call = grpc_callable(self.sync_channel, method, raw)(
                        iter(request), metadata=metadata, timeout=CALL_TIMEOUT
                    )
                    return list(call) if method.server_streaming else [call]

                responses = await asyncio.to_thread(stream)
        except grpc.RpcError as error:
            return Outcome(error.code().name, grpc_detail(error), (error.code().name,))
        texts = [
            r if isinstance(r, bytes) else text_format.MessageToString(r, as_one_line=True) for r in responses[:100]
        ]
        return Outcome("OK", "\n".join(map(str, texts)), ("OK",))

    async def send_http(self, method, request, metadata) -> Outcome:
        verb, template, body = http_rule(method)
        headers = {k.title(): v for k, v in metadata}
        if method.client_streaming:  # a stream's header in the query, its data as the raw body
            header = stream_header(method, request)
            path, bound = fill_template(template, header)
            data = b"".join(v for m in request for f, v in m.ListFields() if f.type == f.TYPE_BYTES)
            headers["Content-Type"] = "application/octet-stream"
            return await self.http_call(verb, path, query_of(header, bound), data, headers)
        path, bound = fill_template(template, request)
        query = {} if body == "*" else query_of(request, bound | {body})
        payload = b""
        if body:
            target = request if body == "*" else getattr(request, body)
            try:
                payload = json_format.MessageToJson(target).encode()
            except Exception as exc:  # a Duration or FieldMask JSON cannot express: send what a client might
                payload = json.dumps({"unconvertible": str(exc)}).encode()
        return await self.http_call(verb, path, query, payload, {**headers, "Content-Type": "application/json"})

    async def http_call(self, verb: str, path: str, query: dict, data: bytes, headers: dict) -> Outcome:
        url = yarl.URL(self.http + path + ("?" + urllib.parse.urlencode(query) if query else ""), encoded=True)
        try:
            async with self.session.request(verb.upper(), url, data=data, headers=headers) as response:
                stream = "ndjson" in response.headers.get("Content-Type", "") or "event-stream" in response.headers.get(
                    "Content-Type", ""
                )
                if stream and OPEN_ENDED_PATHS.search(url.path):
                    raw = await response.content.readline()  # its first event; then the client hangs up
                else:
                    raw = await response.read()
                status = str(response.status)
                kind = response.headers.get("Content-Type", "")
        except TimeoutError:
            return Outcome("TIMEOUT", f"{verb} {path}: no answer in {CALL_TIMEOUT} s")
        except aiohttp.ClientError as exc:
            return Outcome("DISCONNECTED", f"{verb} {path}: {exc!r}")
        text = raw.decode(errors="replace")
        codes = []
        for line in text.splitlines() if ("json" in kind) else ():
            try:
                document = json.loads(line)
            except ValueError:
                continue
            status_body = document.get("error", document) if isinstance(document, dict) else {}
            if isinstance(status_body, dict) and isinstance(status_body.get("code"), int):
                codes.append(STATUS_BY_NUMBER.get(status_body["code"], grpc.StatusCode.UNKNOWN).name)
        return Outcome(status, text[:20000], tuple(codes))

    async def close(self) -> None:
        await self.session.close()
        self.sync_channel.close()
        await self.channel.close()


def stream_header(method, messages):
    """A client stream's header (or config): the first message-typed oneof member set, else an empty one."""
    for message in messages:
        for oneof in message.DESCRIPTOR.oneofs:
            member = message.WhichOneof(oneof.name)
            if member and message.DESCRIPTOR.fields_by_name[member].type == F.TYPE_MESSAGE:
                return getattr(message, member)
    first = next(f for o in method.input_type.oneofs for f in o.fields if f.type == F.TYPE_MESSAGE)
    return message_factory.GetMessageClass(first.message_type)()


def fill_template(template: str, message) -> tuple[str, set[str]]:
    """The HTTP path of `message` under `template` (values as they are, percent-encoded), and the fields it took."""
    bound = set()

    def value(match: re.Match) -> str:
        field = match.group(1)
        bound.add(field.split(".")[0])
        current = message
        for part in field.split("."):
            current = getattr(current, part)
        return urllib.parse.quote(str(current), safe="/")

    return re.sub(r"\{([a-z_.]+)(?:=[^}]+)?\}", value, template), bound


def query_of(message, taken: set[str]) -> dict[str, str]:
    """The fields neither the path nor the body holds, as query parameters (JSON names)."""
    query = {}
    for field, value in message.ListFields():
        if field.name in taken or field.is_repeated:
            continue
        if field.type == field.TYPE_MESSAGE:
            try:
                query[field.json_name] = json.loads(json_format.MessageToJson(value))
            except Exception:
                continue
            if not isinstance(query[field.json_name], str):
                del query[field.json_name]
        elif field.type == field.TYPE_BOOL:
            query[field.json_name] = "true" if value else "false"
        elif field.type == field.TYPE_BYTES:
            query[field.json_name] = base64.b64encode(value).decode()
        else:
            query[field.json_name] = format(value, "o") if field.name == "mode" else str(value)
    return query
