"""E2B's code interpreter (sandbox port 49999) translated onto our CodeService: what the unmodified
`e2b-code-interpreter` SDK sends, answered from RunCode and the context RPCs called on the gateway's own gRPC API with
the caller's credential (so authentication, the tenant wall and audit are the gateway's, as for any call).

- `POST /execute` {code, context_id, language, env_vars} -> RunCode, streamed back as JSON lines (code_results.py) as
  the events come. E2B has no execution timeout on the server: the SDK's `timeout` is a deadline of its own, after
  which it closes the connection. So a run here gets our longest timeout, and a caller going away cancels the call,
  which interrupts the kernel and keeps its state (as RunCode does for any caller that leaves).
- `POST /contexts` {language, cwd}, `GET /contexts`, `DELETE /contexts/{id}`, `POST /contexts/{id}/restart` ->
  CreateCodeContext, ListCodeContexts, DeleteCodeContext, RestartCodeContext; a context as E2B's {id, language, cwd}.

What we refuse comes back as E2B's code interpreter answers it: a plain-text body (our message) with the HTTP status of
the gateway's gRPC-to-HTTP mapping; the SDK raises NotFoundException for 404 and SandboxException for the rest.
"""

from __future__ import annotations

import asyncio
import json
import re

import grpc
from aiohttp import web
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import code_service_pb2 as api
from microvm.sandbox.v1 import code_service_pb2_grpc
from services.gateway.e2b.code_results import failure_lines, lines_of
from services.gateway.e2b.sandbox_call import SandboxCall
from services.gateway.http_files import HTTP_STATUS

RUN_TIMEOUT = duration_pb2.Duration(seconds=24 * 3600)  # RunCode's longest: the SDK's own deadline is what counts
CONTEXT_CALL_SECONDS = 300.0  # creating or restarting a context starts a kernel
DISCONNECT_POLL_SECONDS = 0.5  # how soon a run notices that its caller closed the connection
CONTEXT_PATH = re.compile(r"^/contexts/(?P<context>[^/]+)(?P<restart>/restart)?/?$")


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def handle(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    """One request to port 49999 of `call.sandbox`."""
    try:
        return await _route(request, call)
    except Refusal as refusal:
        return _refused(refusal.status, str(refusal))
    except grpc.aio.AioRpcError as error:
        return _refused(HTTP_STATUS.get(error.code().name, 500), error.details() or error.code().name)


async def _route(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    path, method = request.path.rstrip("/") or "/", request.method
    if path == "/execute" and method == "POST":
        return await _execute(request, call)
    if path == "/contexts" and method == "POST":
        return await _create_context(request, call)
    if path == "/contexts" and method == "GET":
        listed = await _stub(call).ListCodeContexts(
            api.ListCodeContextsRequest(sandbox=_sandbox(call)), metadata=call.metadata, timeout=CONTEXT_CALL_SECONDS
        )
        return web.json_response([_context(context) for context in listed.contexts])
    if found := CONTEXT_PATH.match(path):
        context = found["context"]
        if found["restart"] and method == "POST":
            request_ = api.RestartCodeContextRequest(sandbox=_sandbox(call), context=context)
            await _stub(call).RestartCodeContext(request_, metadata=call.metadata, timeout=CONTEXT_CALL_SECONDS)
            return web.Response(status=204)
        if not found["restart"] and method == "DELETE":
            request_ = api.DeleteCodeContextRequest(sandbox=_sandbox(call), context=context)
            await _stub(call).DeleteCodeContext(request_, metadata=call.metadata, timeout=CONTEXT_CALL_SECONDS)
            return web.Response(status=204)
    raise Refusal(404, f"the code interpreter (port {call.port}) has no {method} {request.path}")


async def _execute(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    body = await _json_body(request)
    code = body.get("code")
    if not isinstance(code, str):
        raise Refusal(400, "`code` (a string) is required")
    run = api.RunCodeRequest(
        sandbox=_sandbox(call),
        code=code,
        language=_text(body, "language"),
        context=_text(body, "context_id"),
        timeout=RUN_TIMEOUT,
        env=_env(body.get("env_vars")),
    )
    stream = _stub(call).RunCode(run, metadata=call.metadata)
    try:
        # A refusal (unknown context or language, a sandbox without the code server) arrives before any event: it
        # must be the answer's status, which is gone once a 200 has started streaming.
        first = await stream.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await _follow(request, response, stream, first)
        return response
    finally:
        stream.cancel()  # a no-op after the end; otherwise the run is interrupted in the kernel


async def _follow(request: web.Request, response: web.StreamResponse, stream, first) -> None:
    """Writes every event as it comes until the run ends or the caller leaves. aiohttp does not tell a handler that its
    caller left (unless the server cancels handlers), and a quiet cell writes nothing for long stretches: the
    connection is looked at every DISCONNECT_POLL_SECONDS."""
    pump = asyncio.ensure_future(_pump(response, stream, first))
    try:
        while not pump.done():
            await asyncio.wait({pump}, timeout=DISCONNECT_POLL_SECONDS)
            transport = request.transport
            if not pump.done() and (transport is None or transport.is_closing()):
                return  # the finally below cancels the pump, the caller's cancel the run
        pump.result()
    except ConnectionError:
        return  # the caller left while an event was being written
    finally:
        pump.cancel()


async def _pump(response: web.StreamResponse, stream, event) -> None:
    try:
        while event is not grpc.aio.EOF:
            for line in lines_of(event):
                await response.write(line)
            event = await stream.read()
    except grpc.aio.AioRpcError as error:
        for line in failure_lines(error.code().name, error.details() or ""):
            await response.write(line)
    await response.write_eof()


async def _create_context(request: web.Request, call: SandboxCall) -> web.Response:
    body = await _json_body(request)
    create = api.CreateCodeContextRequest(
        sandbox=_sandbox(call), language=_text(body, "language"), cwd=_text(body, "cwd"), env=_env(body.get("env_vars"))
    )
    made = await _stub(call).CreateCodeContext(create, metadata=call.metadata, timeout=CONTEXT_CALL_SECONDS)
    return web.json_response(_context(made.context))


def _stub(call: SandboxCall) -> code_service_pb2_grpc.CodeServiceStub:
    return code_service_pb2_grpc.CodeServiceStub(call.channel)


def _sandbox(call: SandboxCall) -> str:
    return call.sandbox if call.sandbox.startswith("sandboxes/") else f"sandboxes/{call.sandbox}"


def _context(context) -> dict:
    return {"id": context.id, "language": context.language, "cwd": context.cwd}


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise Refusal(400, f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object")
    return body


def _text(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Refusal(400, f"`{name}` must be a string")
    return value


def _env(value) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise Refusal(400, "`env_vars` must be an object of strings")
    return value


def _refused(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")
