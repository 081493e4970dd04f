"""envd, the in-sandbox API of E2B (port 49983), translated onto our gRPC API: `handle` serves one request.

Connect RPC `process.Process` (envd_process.py, envd_terminals.py) and `filesystem.Filesystem`
(envd_filesystem.py, envd_watchers.py) over connect_protocol.py; `/files`, `/health`, `/envs`, `/init` and
`/metrics` in envd_http.py. Every operation is a call of our public API (`microvm.sandbox.v1`) on `call.channel`
with the caller's credential: there is no second implementation of exec or files here. How E2B's users map onto
ours: envd_users.py.
"""

from __future__ import annotations

import grpc
from aiohttp import web
from e2b_envd import filesystem_pb2 as fs
from e2b_envd import process_pb2 as proc

from services.gateway.e2b import envd_filesystem, envd_http, envd_process, envd_watchers
from services.gateway.e2b.connect_protocol import (
    ConnectError,
    Method,
    error_response,
    parse_request,
    read_envelopes,
    read_single_envelope,
    serve_stream,
    serve_unary,
)
from services.gateway.e2b.sandbox_call import SandboxCall

METHODS: dict[str, Method] = {
    "/process.Process/Start": Method(proc.StartRequest, proc.StartResponse, "server", envd_process.start),
    "/process.Process/Connect": Method(proc.ConnectRequest, proc.ConnectResponse, "server", envd_process.connect),
    "/process.Process/List": Method(proc.ListRequest, proc.ListResponse, "unary", envd_process.list_processes),
    "/process.Process/SendInput": Method(
        proc.SendInputRequest, proc.SendInputResponse, "unary", envd_process.send_input
    ),
    "/process.Process/StreamInput": Method(
        proc.StreamInputRequest, proc.StreamInputResponse, "client", envd_process.stream_input
    ),
    "/process.Process/SendSignal": Method(
        proc.SendSignalRequest, proc.SendSignalResponse, "unary", envd_process.send_signal
    ),
    "/process.Process/CloseStdin": Method(
        proc.CloseStdinRequest, proc.CloseStdinResponse, "unary", envd_process.close_stdin
    ),
    "/process.Process/Update": Method(proc.UpdateRequest, proc.UpdateResponse, "unary", envd_process.update),
    "/filesystem.Filesystem/Stat": Method(fs.StatRequest, fs.StatResponse, "unary", envd_filesystem.stat),
    "/filesystem.Filesystem/MakeDir": Method(fs.MakeDirRequest, fs.MakeDirResponse, "unary", envd_filesystem.make_dir),
    "/filesystem.Filesystem/Move": Method(fs.MoveRequest, fs.MoveResponse, "unary", envd_filesystem.move),
    "/filesystem.Filesystem/ListDir": Method(fs.ListDirRequest, fs.ListDirResponse, "unary", envd_filesystem.list_dir),
    "/filesystem.Filesystem/Remove": Method(fs.RemoveRequest, fs.RemoveResponse, "unary", envd_filesystem.remove),
    "/filesystem.Filesystem/WatchDir": Method(
        fs.WatchDirRequest, fs.WatchDirResponse, "server", envd_filesystem.watch_dir
    ),
    "/filesystem.Filesystem/CreateWatcher": Method(
        fs.CreateWatcherRequest, fs.CreateWatcherResponse, "unary", envd_watchers.create_watcher
    ),
    "/filesystem.Filesystem/GetWatcherEvents": Method(
        fs.GetWatcherEventsRequest, fs.GetWatcherEventsResponse, "unary", envd_watchers.get_watcher_events
    ),
    "/filesystem.Filesystem/RemoveWatcher": Method(
        fs.RemoveWatcherRequest, fs.RemoveWatcherResponse, "unary", envd_watchers.remove_watcher
    ),
}

ROUTES = {
    ("GET", "/files"): envd_http.download,
    ("POST", "/files"): envd_http.upload,
    ("GET", "/envs"): envd_http.envs,
    ("POST", "/init"): envd_http.init,
    ("GET", "/metrics"): envd_http.metrics,
}


async def handle(request: web.Request, call: SandboxCall) -> web.StreamResponse:
    path = request.path
    if path == "/health":
        return web.Response(status=204)
    if (route := ROUTES.get((request.method, path))) is not None:
        try:
            return await route(request, call)
        except ConnectError as error:
            return envd_http.envd_error(400 if error.code == "invalid_argument" else 500, error.message)
        except grpc.aio.AioRpcError as error:
            return envd_http.envd_error(envd_http._status(error), error.details() or "")
    if (method := METHODS.get(path)) is None:
        if path.startswith(("/process.Process/", "/filesystem.Filesystem/")):
            return error_response(ConnectError("unimplemented", f"{path.lstrip('/')} is not a method of envd"))
        return envd_http.envd_error(404, f"envd has no route {request.method} {path}")
    if request.method != "POST":
        return error_response(ConnectError("unimplemented", f"{path} is called with POST"))
    try:
        rpc = parse_request(request, method)
    except ConnectError as error:
        return error_response(error)
    if method.kind == "unary":
        return await serve_unary(rpc, method, lambda message, rpc: method.handler(message, rpc, call))
    if method.kind == "client":

        async def client_stream(rpc):
            yield await method.handler(read_envelopes(rpc, method.request_type), rpc, call)

        return await serve_stream(rpc, method, client_stream)

    async def server_stream(rpc):
        message = await read_single_envelope(rpc, method.request_type)
        async for reply in method.handler(message, rpc, call):
            yield reply

    return await serve_stream(rpc, method, server_stream)
