"""HTTP/JSON for the public API, driven by the `google.api.http` annotations in protos/.

Routes, path parameters and bodies come from the descriptors, not from a hand-written route per RPC. Each
HTTP request becomes a call on the gateway's own gRPC server over loopback, with the caller's
`Authorization` header, so authentication, tenancy, quotas and errors are exactly those of gRPC.
- JSON both ways via protobuf's json_format (bytes fields are base64, as proto3 JSON says).
- Exec streams newline-delimited JSON events, or server-sent events with `Accept: text/event-stream`.
- ReadFile answers the raw file, ReadConsoleLog the raw console bytes, DownloadArchive the raw tar; WriteFile and
  UploadArchive take the raw body (`?path=...&mode=...&makeParents=true`): http_files.py. WatchDir streams NDJSON.
- BuildTemplate (a bidirectional stream, so no annotation) is `POST /v1/templates/{name}:build`: http_builds.py.
- Errors are a JSON google.rpc.Status with the standard gRPC-to-HTTP code mapping.
- `/openapi.json` is an OpenAPI 3 document generated from the same descriptors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc
from aiohttp import web
from google.api import annotations_pb2
from google.protobuf import descriptor, json_format
from google.rpc import status_pb2
from grpc_status import rpc_status

from microvm.admin.v1 import nodes_pb2
from microvm.sandbox.v1 import (
    code_service_pb2,
    desktop_service_pb2,
    event_service_pb2,
    metrics_service_pb2,
    port_forward_service_pb2,
    template_service_pb2,
    webhook_service_pb2,
)
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common import deadlines
from services.gateway import http_builds
from services.gateway.http_files import DOWNLOADS, HTTP_STATUS, UPLOADS, download, error_response, upload

__all__ = ["HTTP_STATUS", "HttpGateway", "error_response", "routes"]

# Every service the gateway serves over gRPC, served over HTTP too.
SERVICES = (
    api.DESCRIPTOR.services_by_name["SandboxService"],
    nodes_pb2.DESCRIPTOR.services_by_name["NodeService"],
    template_service_pb2.DESCRIPTOR.services_by_name["TemplateService"],
    code_service_pb2.DESCRIPTOR.services_by_name["CodeService"],
    port_forward_service_pb2.DESCRIPTOR.services_by_name["PortForwardService"],  # bidirectional: gRPC only
    desktop_service_pb2.DESCRIPTOR.services_by_name["DesktopService"],
    metrics_service_pb2.DESCRIPTOR.services_by_name["SandboxMetricsService"],
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"],
)
# Server streams of `data` chunks, answered as the bytes themselves; client streams that take the raw body.
RAW_STREAMS = tuple(DOWNLOADS)


@dataclass
class Route:
    method: descriptor.MethodDescriptor
    verb: str
    template: str
    pattern: re.Pattern
    fields: dict[str, str]  # regex group -> request field path
    body: str


def parse_template(template: str) -> tuple[re.Pattern, dict[str, str]]:
    fields: dict[str, str] = {}
    regex, position = "", 0
    for index, match in enumerate(re.finditer(r"\{([a-z_.]+)(?:=([^}]+))?\}", template)):
        regex += re.escape(template[position : match.start()])
        group = f"f{index}"
        fields[group] = match.group(1)
        segments = match.group(2) or "*"
        regex += f"(?P<{group}>" + "/".join("[^/:]+" if s == "*" else re.escape(s) for s in segments.split("/")) + ")"
        position = match.end()
    regex += re.escape(template[position:])
    return re.compile(f"^{regex}$"), fields


def routes() -> list[Route]:
    found = []
    for method in (m for service in SERVICES for m in service.methods):
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb is None and method.name in http_builds.BUILDS:
            verb, template = http_builds.BUILDS[method.name]
        elif verb is None:
            continue  # other bidirectional streams (ExecInteractive) have no HTTP form
        else:
            template = getattr(rule, verb)
        pattern, fields = parse_template(template)
        found.append(Route(method, verb.upper(), template, pattern, fields, rule.body))
    return found


URL_WELL_KNOWN_TYPES = ("google.protobuf.FieldMask", "google.protobuf.Duration", "google.protobuf.Timestamp")


def set_field(message, path: str, value: str) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        message = getattr(message, name)
    field = message.DESCRIPTOR.fields_by_name.get(leaf)
    if field is None:
        raise ValueError(f"unknown field {path!r}")
    if (
        not field.is_repeated
        and field.type == field.TYPE_MESSAGE
        and field.message_type.full_name in URL_WELL_KNOWN_TYPES
    ):
        # FieldMask, Duration, Timestamp: their JSON form is a string (`updateMask=labels,networkPolicy`). A mask
        # written with proto names (`network_policy`), which JSON's FieldMask form refuses, is taken as paths.
        if field.message_type.full_name == "google.protobuf.FieldMask" and "_" in value:
            getattr(message, leaf).paths.extend(path.strip() for path in value.split(","))
        else:
            json_format.Parse(json.dumps(value), getattr(message, leaf))
        return
    if field.is_repeated or field.type == field.TYPE_MESSAGE:
        raise ValueError(f"field {path!r} cannot be set from the URL")
    converters = {
        field.TYPE_BOOL: lambda v: v.lower() in ("true", "1"),
        field.TYPE_STRING: str,
        field.TYPE_BYTES: str.encode,
        field.TYPE_DOUBLE: float,
        field.TYPE_FLOAT: float,
    }
    setattr(message, leaf, converters.get(field.type, int)(value))


def bad_request(message: str) -> web.Response:
    return web.json_response({"code": 3, "message": message}, status=400)


class HttpGateway:
    def __init__(self, grpc_address: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            grpc_address,
            options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
        )
        self.routes = routes()

    def app(self, add_routes=None) -> web.Application:
        """The application; `add_routes(app)` adds routes of other parts (desktop live views) before the API's."""
        # A build's definition may come in the query string (http_builds.py): request lines up to 4 MiB.
        app = web.Application(client_max_size=64 << 20, handler_args={"max_line_size": 4 << 20})
        app.router.add_get("/openapi.json", self.openapi)
        if add_routes is not None:
            add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    def _match(self, verb: str, path: str):
        for route in self.routes:
            if route.verb == verb and (match := route.pattern.fullmatch(path)):
                return route, match
        return None, None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        route, match = self._match(request.method, request.path)
        if route is None:
            return web.json_response(
                {"code": 5, "message": f"no route for {request.method} {request.path}"}, status=404
            )
        metadata = [("authorization", request.headers["Authorization"])] if "Authorization" in request.headers else []
        message = route.method.input_type._concrete_class()
        if route.method.name in http_builds.BUILDS:
            call = self._callable(route.method)
            return await http_builds.build(request, call, match.group("f0"), metadata, self._stream_events)
        try:
            if route.method.name in UPLOADS:
                call = self._callable(route.method)
                return await upload(request, call, route.method.name, match.group("f0"), metadata)
            raw = await request.read()
            if raw and route.body:
                target = message if route.body == "*" else getattr(message, route.body)
                json_format.Parse(raw, target, ignore_unknown_fields=False)
            for group, field in route.fields.items():
                set_field(message, field, match.group(group))
            if route.body != "*":  # what neither the path nor the body holds comes from the query string
                for key, value in request.query.items():
                    set_field(message, _snake(key), value)
        except (json_format.ParseError, ValueError) as exc:
            return bad_request(str(exc))
        call = self._callable(route.method)
        try:
            if not route.method.server_streaming:
                reply = await call(message, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
                return web.json_response(json_format.MessageToDict(reply))
            if route.method.name in DOWNLOADS:
                stream = call(message, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
                return await download(request, stream, DOWNLOADS[route.method.name])
            return await self._stream_events(request, call(message, metadata=metadata, timeout=deadlines.PUBLIC_STREAM))
        except grpc.aio.AioRpcError as error:
            return error_response(error)

    async def _stream_events(self, request: web.Request, call) -> web.StreamResponse:
        sse = "text/event-stream" in request.headers.get("Accept", "")
        response = None
        try:
            async for event in call:
                if response is None:
                    response = web.StreamResponse(
                        headers={"Content-Type": "text/event-stream" if sse else "application/x-ndjson"}
                    )
                    await response.prepare(request)
                text = json.dumps(json_format.MessageToDict(event))
                await response.write((f"data: {text}\n\n" if sse else text + "\n").encode())
        except grpc.aio.AioRpcError as error:
            if response is None:
                return error_response(error)
            # Headers are gone: the error becomes the last event of the stream.
            status = json_format.MessageToDict(
                rpc_status.from_call(error) or status_pb2.Status(code=error.code().value[0], message=error.details())
            )
            text = json.dumps({"error": status})
            await response.write((f"event: error\ndata: {text}\n\n" if sse else text + "\n").encode())
        if response is None:
            response = web.StreamResponse()
            await response.prepare(request)
        await response.write_eof()
        return response

    def _callable(self, method: descriptor.MethodDescriptor):
        """The gRPC call of `method` on this gateway, whichever service it belongs to."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        kind = ("stream_" if method.client_streaming else "unary_") + ("stream" if method.server_streaming else "unary")
        return getattr(self.channel, kind)(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=method.output_type._concrete_class.FromString,
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(self.routes))

    async def close(self) -> None:
        await self.channel.close()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


SCALARS = {
    descriptor.FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    descriptor.FieldDescriptor.TYPE_STRING: {"type": "string"},
    descriptor.FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    descriptor.FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    descriptor.FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    descriptor.FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
}
WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
}


def schema_of(message: descriptor.Descriptor, schemas: dict) -> dict:
    if message.full_name in WELL_KNOWN:
        return WELL_KNOWN[message.full_name]
    name = message.full_name.replace(".", "_")
    if name not in schemas:
        schemas[name] = {}
        properties = {}
        for field in message.fields:
            if field.message_type and field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"]
                item = schema_of(value.message_type, schemas) if value.message_type else SCALARS.get(value.type, {})
                properties[field.json_name] = {"type": "object", "additionalProperties": item}
                continue
            if field.message_type:
                item = schema_of(field.message_type, schemas)
            elif field.enum_type:
                item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
            else:
                item = SCALARS.get(field.type, {"type": "integer"})
            properties[field.json_name] = {"type": "array", "items": item} if field.is_repeated else item
        schemas[name] = {"type": "object", "properties": properties}
    return {"$ref": f"#/components/schemas/{name}"}


def query_parameters(route) -> list[dict]:
    """Fields neither the path nor the body holds: scalars and FieldMask/Duration/Timestamp, by JSON name."""
    if route.body == "*":
        return []
    taken = {field.split(".")[0] for field in route.fields.values()} | {route.body}
    result = []
    for field in route.method.input_type.fields:
        if field.name in taken or field.is_repeated:
            continue
        if field.type == field.TYPE_MESSAGE and field.message_type.full_name not in URL_WELL_KNOWN_TYPES:
            continue
        kind = {field.TYPE_BOOL: "boolean", field.TYPE_DOUBLE: "number", field.TYPE_FLOAT: "number"}.get(
            field.type,
            "string" if field.type in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE) else "integer",
        )
        result.append({"name": field.json_name, "in": "query", "required": False, "schema": {"type": kind}})
    return result


def openapi_document(route_list: list[Route]) -> dict:
    schemas: dict = {}
    paths: dict = {}
    error = {
        "description": "a google.rpc.Status",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "integer"},
                        "message": {"type": "string"},
                        "details": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
    for route in route_list:
        path = route.template
        parameters = []
        for field in route.fields.values():
            name = field.replace(".", "_")

            # `{name=sandboxes/*}` is `sandboxes/{name}` in OpenAPI: literal segments stay in the path.
            def render(match: re.Match, name: str = name) -> str:
                literal = (match.group(1) or "=*")[1:].rsplit("*", 1)[0]
                return f"{literal}{{{name}}}"

            path = re.sub(r"\{" + re.escape(field) + r"(=[^}]+)?\}", render, path)
            parameters.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
        operation = {
            "operationId": route.method.name,
            "parameters": parameters,
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/x-ndjson"
                        if route.method.server_streaming and route.method.name not in RAW_STREAMS
                        else "application/json": {"schema": schema_of(route.method.output_type, schemas)}
                    },
                },
                "default": error,
            },
        }
        if route.method.name in UPLOADS:
            operation["parameters"] += [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}]
            operation["requestBody"] = {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            }
        else:
            operation["parameters"] += query_parameters(route)
        if route.method.name in http_builds.BUILDS:
            http_builds.document(
                operation, schema_of(route.method.input_type.fields_by_name["spec"].message_type, schemas)
            )
        if route.body and route.method.name not in UPLOADS:
            target = (
                route.method.input_type
                if route.body == "*"
                else route.method.input_type.fields_by_name[route.body].message_type
            )
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of(target, schemas)}},
            }
        paths.setdefault(path, {})[route.verb.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "MicroVM Sandbox API",
            "version": "v1",
            "description": "Generated from the google.api.http annotations of microvm.sandbox.v1 and microvm.admin.v1.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
