"""BuildTemplate over HTTP: `POST /v1/templates/{name}:build` (the rest of the HTTP door: http.py, http_files.py).

BuildTemplate is a bidirectional gRPC stream (the spec, then the build context as tar chunks; the build's events
back), so it has no google.api.http annotation; this is its HTTP form. Two ways to ask:
- the definition in the query string (`dockerfile=` or `recipe=` text, `tag=` and `buildArg=K=V` repeated,
  `noCache=true`) and the build context as the raw body, a tar stream (`Content-Type: application/x-tar`; may be
  empty), passed on in chunks of at most 1 MiB as it arrives;
- a JSON `BuildTemplateSpec` as the body (`{"dockerfile"|"recipe": ..., "tags": [...], "buildArgs": {...},
  "noCache": bool}`), with no context.
The answer is the build's events as newline-delimited JSON, or server-sent events with `Accept: text/event-stream`
(http.py streams them as it does Exec's). A request refused before the build starts is the usual JSON
google.rpc.Status with the mapped HTTP status; a build that fails after it started ends its stream with a FAILED
build event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from google.protobuf import json_format

from microvm.sandbox.v1 import template_service_pb2 as api
from services.common import deadlines
from services.common.client_streams import refused

CHUNK = 1 << 20
# Method -> (verb, path template) of the methods http.py serves here rather than from an annotation.
BUILDS = {"BuildTemplate": ("POST", "/v1/{spec.template=templates/*}:build")}
TAR_TYPES = ("application/x-tar",)
# Query keys (JSON name, proto name, and the singular the URL reads best with) -> spec field.
QUERY_FIELDS = {
    "dockerfile": "dockerfile",
    "recipe": "recipe",
    "tag": "tags",
    "tags": "tags",
    "buildArg": "build_args",
    "buildArgs": "build_args",
    "build_arg": "build_args",
    "build_args": "build_args",
    "noCache": "no_cache",
    "no_cache": "no_cache",
}


def query_spec(template: str, query) -> api.BuildTemplateSpec:
    """The spec the query string describes (ValueError for a key it has no field for or a bad value)."""
    spec = api.BuildTemplateSpec(template=template)
    for key, value in query.items():
        field = QUERY_FIELDS.get(key)
        if field is None:
            raise ValueError(f"unknown query parameter {key!r} (dockerfile, recipe, tag, buildArg, noCache)")
        if field == "tags":
            spec.tags.append(value)
        elif field == "build_args":
            name, equals, arg = value.partition("=")
            if not equals or not name:
                raise ValueError(f"buildArg {value!r} is not NAME=VALUE")
            spec.build_args[name] = arg
        elif field == "no_cache":
            spec.no_cache = value.lower() in ("true", "1")
        else:
            setattr(spec, field, value)
    return spec


async def read_spec(request: web.Request, template: str) -> tuple[api.BuildTemplateSpec, bool]:
    """The spec, and whether the body is the build context (else it was the JSON spec, read here). ValueError or
    json_format.ParseError when the request does not say what to build in a form this route takes."""
    spec = query_spec(template, request.query)
    raw_context = "dockerfile" in request.query or "recipe" in request.query
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if raw_context and content_type == "application/json":
        raise ValueError("the definition goes in the query string (and the context as a tar body) or in a JSON body")
    if not raw_context and content_type in TAR_TYPES:
        raise ValueError("with a tar body, the definition goes in the query string: dockerfile=... or recipe=...")
    if not raw_context:
        body = await request.read()
        if body.strip():
            given = json_format.Parse(body, api.BuildTemplateSpec(), ignore_unknown_fields=False)
            if given.template and given.template != template:
                raise ValueError(f"the body names template {given.template!r}, the path {template!r}")
            spec.MergeFrom(given)
    return spec, raw_context


async def requests(request: web.Request, spec: api.BuildTemplateSpec, raw_context: bool, stop: asyncio.Event):
    """BuildTemplate's request stream: the spec, then the body in chunks (until it ends or `stop` is set)."""
    yield api.BuildTemplateRequest(spec=spec)
    if not raw_context:
        return
    while not stop.is_set() and (chunk := await request.content.read(CHUNK)):
        yield api.BuildTemplateRequest(context=chunk)


async def build_events(call, messages_for, metadata) -> AsyncIterator[api.BuildTemplateResponse]:
    """The events of the BuildTemplate call `call` (a grpc stream_stream callable) sending `messages_for(stop)`;
    sending stops at once when the server says it refused the call (initial metadata `mvm-refused`), so its status
    is not lost to a write in flight (services/common/client_streams.py)."""
    stop = asyncio.Event()
    stream = call(messages_for(stop), metadata=metadata, timeout=deadlines.PUBLIC_STREAM)

    async def watch() -> None:
        with contextlib.suppress(Exception):
            if refused(await stream.initial_metadata()):
                stop.set()

    watcher = asyncio.ensure_future(watch())
    try:
        async for event in stream:
            yield event
    finally:
        watcher.cancel()
        stop.set()


async def build(request: web.Request, call, template: str, metadata, stream_events) -> web.StreamResponse:
    """Serves `POST /v1/templates/{name}:build`: `stream_events(request, events)` answers the events (http.py's
    NDJSON or SSE writer)."""
    try:
        spec, raw_context = await read_spec(request, template)
    except (json_format.ParseError, ValueError) as exc:
        return web.json_response({"code": 3, "message": str(exc)}, status=400)
    events = build_events(call, lambda stop: requests(request, spec, raw_context, stop), metadata)
    return await stream_events(request, events)


def document(operation: dict, spec_schema: dict) -> None:
    """The route's OpenAPI operation: the query parameters and both bodies (http.py generated the rest)."""

    def query(name: str, schema: dict) -> dict:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    strings = {"type": "array", "items": {"type": "string"}}
    operation["parameters"] = [p for p in operation["parameters"] if p["in"] == "path"] + [
        query("dockerfile", {"type": "string"}),
        query("recipe", {"type": "string"}),
        {**query("tag", strings), "explode": True},
        {**query("buildArg", strings), "explode": True, "description": "NAME=VALUE"},
        query("noCache", {"type": "boolean"}),
    ]
    operation["requestBody"] = {
        "content": {
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": spec_schema},
        }
    }
    operation["description"] = (
        "The build context as a tar body with the definition in the query string, or a JSON BuildTemplateSpec "
        "with no context; answers the build's events (NDJSON, or SSE with Accept: text/event-stream)."
    )
