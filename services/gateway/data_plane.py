"""DataPlane: exec and file calls routed to the relay of the sandbox's node, with the caller's own messages.

The gateway checks who may reach which sandbox and that it runs; what the call does is the relay's (it owns the
guest channel). Nothing is re-declared or translated on the way: the relay serves the same methods of the public
API. A stream is bound to its node: if the node's lease runs out mid-stream, the call ends UNAVAILABLE instead
of hanging on a node nobody hears from. Cancellation and deadlines propagate to the relay, which kills the
guest process.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.client_streams import drain, send_until_refused
from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.validation import (
    check_mode,
    check_path,
    check_process,
    check_range,
    check_removable,
    check_rename,
)
from services.gateway.nodes import ClusterNodes
from services.gateway.records import SandboxRecord
from services.gateway.sandboxes import Sandboxes

M = TypeVar("M", bound=Message)

NODE_CHECK_SECONDS = 0.5
# The first messages of bidirectional streams (ExecInteractive's config, ForwardPort's target).
BIDI_OPENINGS = ("config", "target")


def on_node(message: M, record: SandboxRecord, part: str = "") -> M:
    """A copy of `message` naming the sandbox as its node knows it: by cluster id (the caller's name is per tenant).
    The caller's own message stays as it came (the audit records what was asked)."""
    forwarded = type(message)()
    forwarded.CopyFrom(message)
    (getattr(forwarded, part) if part else forwarded).sandbox = f"sandboxes/{record.id}"
    return forwarded


def with_sandbox_env(process, record: SandboxRecord) -> None:
    """The sandbox's environment under the command's own (a name the command sets keeps its value), and its
    template's working directory and user for a command that names none."""
    for name, value in record.env.items():
        if name not in process.env:
            process.env[name] = value
    if not process.cwd and record.default_cwd:
        process.cwd = record.default_cwd
    if not process.user and record.default_user:
        process.user = record.default_user


class DataPlane:
    def __init__(self, sandboxes: Sandboxes, nodes: ClusterNodes) -> None:
        self.sandboxes, self.nodes = sandboxes, nodes

    async def _guarded(self, record: SandboxRecord, call):
        """Yields the relay call's responses while the sandbox's node stays alive."""
        instance_key = self.nodes.compute_instance_key(record.node)
        node_lost = asyncio.Event()

        async def watch_node():
            while any(i.key == instance_key for i in self.nodes.context.directory.instances("compute")):
                await asyncio.sleep(NODE_CHECK_SECONDS)
            node_lost.set()
            call.cancel()

        watcher = asyncio.create_task(watch_node())
        responses = call.__aiter__()
        try:
            while True:
                try:
                    response = await responses.__anext__()
                except StopAsyncIteration:
                    return
                except (asyncio.CancelledError, grpc.aio.AioRpcError):
                    if node_lost.is_set():
                        break
                    raise
                yield response
        finally:
            watcher.cancel()
            call.cancel()
        raise Unavailable(
            f"node {record.node} went away while the call ran; its process was stopped",
            reason="NODE_UNAVAILABLE",
            metadata={"node": record.node},
        )

    def follow(self, record: SandboxRecord, call):
        """The responses of a server-streaming relay `call` while the sandbox's node stays alive."""
        return self._guarded(record, call)

    async def exec(self, request: api.ExecRequest, deadline: float | None):
        check_process(request.process)
        record = await self.sandboxes.running(request.sandbox)
        forwarded = on_node(request, record)
        with_sandbox_env(forwarded.process, record)
        async for event in self._guarded(record, self.nodes.relay(record.node).Exec(forwarded, timeout=deadline)):
            yield event

    async def opening(self, requests, part: str, check) -> tuple:
        """The first message of a client stream (it must carry `part`, which `check` validates) and the running
        sandbox it names. Refused, the stream is read to its end first (a bounded while): the caller then gets this
        status, not the INTERNAL its grpc reports for a call that ends under a write in flight (grpc/grpc#36066)."""
        first = await anext(aiter(requests), None)
        try:
            if first is None or first.WhichOneof("request") != part:
                raise InvalidArgument(f"the first message must carry the {part}")
            check(getattr(first, part))
            return first, await self.sandboxes.running(getattr(first, part).sandbox)
        except ServiceError:
            if part in BIDI_OPENINGS:  # a bidirectional stream; client streams are drained by the error interceptor
                await drain(requests)
            raise

    async def exec_interactive(self, requests, deadline: float | None):
        first, record = await self.opening(requests, "config", lambda c: check_process(c.process))
        forwarded = on_node(first, record, "config")
        with_sandbox_env(forwarded.config.process, record)

        async def upstream():
            yield forwarded
            async for message in requests:
                yield message

        call = self.nodes.relay(record.node).ExecInteractive(upstream(), timeout=deadline)
        async for event in self._guarded(record, call):
            yield event

    async def write_file(self, requests, deadline: float | None) -> api.WriteFileResponse:
        first, record = await self.opening(requests, "header", lambda h: (check_path(h.path), check_mode(h.mode)))
        forwarded = on_node(first, record, "header")

        async def upstream():
            yield forwarded
            async for message in requests:
                yield message

        return await send_until_refused(
            lambda r: self.nodes.relay(record.node).WriteFile(r, timeout=deadline), upstream()
        )

    async def read_file(self, request: api.ReadFileRequest, deadline: float | None):
        check_path(request.path)
        check_range(request.offset, request.length)
        record = await self.sandboxes.running(request.sandbox)
        forwarded = on_node(request, record)
        async for chunk in self._guarded(record, self.nodes.relay(record.node).ReadFile(forwarded, timeout=deadline)):
            yield chunk

    async def upload_archive(self, requests, deadline: float | None) -> api.UploadArchiveResponse:
        first, record = await self.opening(requests, "header", lambda h: check_path(h.path))
        forwarded = on_node(first, record, "header")

        async def upstream():
            yield forwarded
            async for message in requests:
                yield message

        return await send_until_refused(
            lambda r: self.nodes.relay(record.node).UploadArchive(r, timeout=deadline), upstream()
        )

    async def download_archive(self, request: api.DownloadArchiveRequest, deadline: float | None):
        check_path(request.path)
        record = await self.sandboxes.running(request.sandbox)
        call = self.nodes.relay(record.node).DownloadArchive(on_node(request, record), timeout=deadline)
        async for chunk in self._guarded(record, call):
            yield chunk

    async def watch_dir(self, request: api.WatchDirRequest, deadline: float | None):
        check_path(request.path)
        record = await self.sandboxes.running(request.sandbox)
        call = self.nodes.relay(record.node).WatchDir(on_node(request, record), timeout=deadline)
        async for event in self._guarded(record, call):
            yield event

    async def unary(self, method: str, request, deadline: float | None):
        """ListDir, Stat, MakeDir, Remove, Rename: one request, one answer, from the sandbox's node."""
        if method == "Rename":
            check_rename(request.source, request.destination)
        else:
            check_path(request.path)
        if method == "Remove":
            check_removable(request.path)
        if method == "MakeDir":
            check_mode(request.mode)
        record = await self.sandboxes.running(request.sandbox)
        return await getattr(self.nodes.relay(record.node), method)(on_node(request, record), timeout=deadline)
