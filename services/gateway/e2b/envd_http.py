"""envd's plain HTTP routes: `/files` (download and upload, streamed), `/health`, `/envs`, `/init`, `/metrics`.

`/files` is our ReadFile and WriteFile, a chunk at a time both ways (a file of any size passes through the
gateway without being held): GET answers the bytes; POST takes `application/octet-stream` (the `path` query
parameter names the file; aiohttp inflates `Content-Encoding: gzip` on the way) or `multipart/form-data` (each
`file` part is a file, named by `path` when there is one part, else by the part's filename, as envd does),
creating parent directories, and answers envd's list of `{path, name, type}`. Errors are envd's `{"code": <status>,
"message": ...}`. `X-Metadata-*` headers (xattr metadata on uploads) are refused: our file API keeps none.
`/init` is the orchestrator's call to envd: it is accepted (204) and applies nothing, because what it carries is set
elsewhere here (env vars at create by the control plane; access tokens by the front door)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from email.message import Message
from email.utils import collapse_rfc2231_value

import grpc
from aiohttp import BodyPartReader, web
from aiohttp.hdrs import CONTENT_DISPOSITION

from microvm.sandbox.v1 import metrics_service_pb2, metrics_service_pb2_grpc, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b.connect_protocol import HTTP_STATUS, ConnectError
from services.gateway.e2b.envd_users import absolute, our_user
from services.gateway.e2b.sandbox_call import SandboxCall

CHUNK = 1 << 20  # WriteFile's largest data message
RPC_SECONDS = 30.0
MIB = 1 << 20


def envd_error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _status(error: grpc.aio.AioRpcError) -> int:
    code = ConnectError.from_grpc(error).code
    # envd answers 507 for a full disk, which is our RESOURCE_EXHAUSTED on a write.
    return 507 if code == "resource_exhausted" else HTTP_STATUS.get(code, 500)


def _stub(call: SandboxCall) -> sandbox_service_pb2_grpc.SandboxServiceStub:
    return sandbox_service_pb2_grpc.SandboxServiceStub(call.channel)


def _user(request: web.Request) -> str:
    return our_user(request.query.get("username"))


async def download(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    if not request.query.get("path"):
        return envd_error(400, "the path query parameter names the file to download")
    path = absolute(request.query["path"], _user(request))
    chunks = _stub(call).ReadFile(
        api.ReadFileRequest(sandbox=f"sandboxes/{call.sandbox}", path=path), metadata=call.metadata
    )
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    try:
        async for chunk in chunks:
            if not response.prepared:  # only once the file opened: its errors are answered as such
                await response.prepare(request)
            await response.write(chunk.data)
    except grpc.aio.AioRpcError as error:
        if response.prepared:  # mid-file: the status is sent, only breaking the connection tells the client
            raise
        return envd_error(_status(error), error.details() or "")
    except ConnectionResetError:  # the caller stopped reading: the file is not needed any more
        return response
    finally:
        chunks.cancel()
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def _write(call: SandboxCall, path: str, data: AsyncIterator[bytes]) -> dict:
    async def messages():
        header = api.WriteFileHeader(sandbox=f"sandboxes/{call.sandbox}", path=path, make_parents=True)
        yield api.WriteFileRequest(header=header)
        async for piece in data:
            for offset in range(0, len(piece), CHUNK):
                yield api.WriteFileRequest(data=piece[offset : offset + CHUNK])

    reply = await _stub(call).WriteFile(messages(), metadata=call.metadata)
    return {"path": reply.file.path, "name": reply.file.path.rsplit("/", 1)[-1], "type": "file"}


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it comes (aiohttp has already inflated a `Content-Encoding: gzip` body)."""
    async for piece in request.content.iter_chunked(CHUNK):
        yield piece


def _part_path(part: BodyPartReader) -> str | None:
    """The part's filename as sent: the SDK puts the file's path there, and aiohttp's own parser drops a leading
    `/` (a safety measure for saving uploads locally that would make every absolute path relative)."""
    message = Message()
    message["Content-Disposition"] = part.headers.get(CONTENT_DISPOSITION, "")
    value = message.get_param("filename", header="Content-Disposition")
    return collapse_rfc2231_value(value) if value else None


async def _part(part: BodyPartReader) -> AsyncIterator[bytes]:
    while piece := await part.read_chunk(CHUNK):
        yield piece


async def upload(request: web.Request, call: SandboxCall) -> web.Response:
    if any(name.lower().startswith("x-metadata-") for name in request.headers):
        return envd_error(400, "file metadata (X-Metadata-* headers) is not supported by this backend")
    user, named = _user(request), request.query.get("path")
    content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        return envd_error(400, f"Content-Encoding {encoding!r} is not supported (identity, gzip)")
    written = []
    try:
        if content_type == "multipart/form-data":
            reader = await request.multipart()  # the parts are read as they come, never the whole body
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                target = named if named and not written else _part_path(part)
                if not target:
                    return envd_error(400, "a file part names no path (filename) and no path query parameter")
                written.append(await _write(call, absolute(target, user), _part(part)))
            if not written:
                return envd_error(400, "the multipart body has no `file` part")
        elif content_type in ("application/octet-stream", ""):
            if not named:
                return envd_error(400, "the path query parameter names the file of an octet-stream upload")
            written.append(await _write(call, absolute(named, user), _body(request)))
        else:
            return envd_error(400, f"upload as multipart/form-data or application/octet-stream, not {content_type}")
    except grpc.aio.AioRpcError as error:
        return envd_error(_status(error), error.details() or "")
    except ValueError as error:  # a malformed multipart body
        return envd_error(400, f"the multipart body is malformed: {error}")
    return web.json_response(written)


async def envs(request: web.Request, call: SandboxCall) -> web.Response:
    reply = await _stub(call).GetSandbox(
        api.GetSandboxRequest(name=f"sandboxes/{call.sandbox}"), metadata=call.metadata, timeout=RPC_SECONDS
    )
    return web.json_response(dict(reply.sandbox.env))


async def init(request: web.Request, call: SandboxCall) -> web.Response:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return envd_error(400, "the body is not JSON")
    if not isinstance(body, dict):
        return envd_error(400, "the body is a JSON object")
    return web.Response(status=204)


async def metrics(request: web.Request, call: SandboxCall) -> web.Response:
    """The newest resource sample in envd's shape (zeros with the current time before the first sample)."""
    stub = metrics_service_pb2_grpc.SandboxMetricsServiceStub(call.channel)
    newest = None
    async for reply in stub.GetSandboxMetrics(
        metrics_service_pb2.GetSandboxMetricsRequest(sandbox=f"sandboxes/{call.sandbox}"),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    ):
        if reply.samples:
            newest = reply.samples[-1]
    if newest is None:
        return web.json_response({"ts": int(time.time())})
    total = newest.guest_memory_total_bytes or newest.memory_limit_bytes
    used = newest.guest_memory_used_bytes or newest.memory_bytes
    return web.json_response(
        {
            "ts": newest.time.seconds,
            "cpu_count": newest.vcpus,
            "cpu_used_pct": round(newest.cpu_percent, 2),
            "mem_total": total,
            "mem_used": used,
            "mem_total_mib": total // MIB,
            "mem_used_mib": used // MIB,
            "disk_used": newest.disk_bytes,
        }
    )
