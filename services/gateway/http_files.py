"""Raw bytes over HTTP for the methods whose gRPC form is a stream of chunks (the rest of the HTTP door: http.py).

- Uploads (a client stream: a header, then `data` chunks): WriteFile and UploadArchive take the raw body, streamed on
  in 1 MiB chunks as it arrives; the header's fields come from the path (the sandbox) and the query string
  (`?path=/dir`, WriteFile's `mode` in octal, booleans as `true`/`1`).
- Downloads (a server stream of `data` chunks): ReadFile, ReadConsoleLog and DownloadArchive answer the bytes
  themselves, each chunk written as it comes. Neither way holds more than a chunk in the gateway.
"""

from __future__ import annotations

import re

import grpc
from aiohttp import web
from google.protobuf import descriptor, json_format
from google.rpc import status_pb2
from grpc_status import rpc_status

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common import deadlines
from services.common.client_streams import send_until_refused

HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

UPLOAD_CHUNK = 1 << 20
# Method -> (request message, its header field): the header comes from the URL, the body is the data.
UPLOADS = {"WriteFile": (api.WriteFileRequest, "header"), "UploadArchive": (api.UploadArchiveRequest, "header")}
# Method -> content type of the bytes answered.
DOWNLOADS = {
    "ReadFile": "application/octet-stream",
    "ReadConsoleLog": "application/octet-stream",
    "DownloadArchive": "application/x-tar",
}
OCTAL_FIELDS = ("mode",)
F = descriptor.FieldDescriptor


def error_response(error: grpc.aio.AioRpcError) -> web.Response:
    """A failed call as the door answers it: a JSON google.rpc.Status with the gRPC-to-HTTP code mapping."""
    status = rpc_status.from_call(error) or status_pb2.Status(code=error.code().value[0], message=error.details())
    return web.json_response(json_format.MessageToDict(status), status=HTTP_STATUS.get(error.code().name, 500))


def upload_header(method: str, sandbox: str, query) -> tuple[type, str, object]:
    """The request class, its header field and the header for an upload of `method` (ValueError when a query value
    does not parse). Query keys that name no header field are ignored."""
    request_class, part = UPLOADS[method]
    header = request_class.DESCRIPTOR.fields_by_name[part].message_type._concrete_class(sandbox=sandbox)
    for key, value in query.items():
        field = header.DESCRIPTOR.fields_by_name.get(re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower())
        if field is None or field.name == "sandbox":
            continue
        if field.type == F.TYPE_BOOL:
            setattr(header, field.name, value.lower() in ("true", "1"))
        elif field.type == F.TYPE_STRING:
            setattr(header, field.name, value)
        else:
            setattr(header, field.name, int(value, 8 if field.name in OCTAL_FIELDS else 10))
    return request_class, part, header


async def upload(request: web.Request, call, method: str, sandbox: str, metadata) -> web.Response:
    """Streams the request body into the client stream `call` (a grpc stream_unary callable) of `method`."""
    request_class, part, header = upload_header(method, sandbox, request.query)

    async def messages():
        yield request_class(**{part: header})
        while chunk := await request.content.read(UPLOAD_CHUNK):
            yield request_class(data=chunk)

    try:
        reply = await send_until_refused(
            lambda r: call(r, metadata=metadata, timeout=deadlines.PUBLIC_CALL), messages()
        )
    except grpc.aio.AioRpcError as error:
        return error_response(error)
    return web.json_response(json_format.MessageToDict(reply))


async def download(request: web.Request, call, content_type: str) -> web.StreamResponse:
    """The `data` of each response of the server stream `call`, as the body; an error before the first byte is the
    usual JSON status, after it the connection is cut (the headers are gone)."""
    response = None
    try:
        async for chunk in call:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": content_type})
                await response.prepare(request)
            await response.write(chunk.data)
    except grpc.aio.AioRpcError as error:
        if response is None:
            return error_response(error)
        raise
    if response is None:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
    await response.write_eof()
    return response
