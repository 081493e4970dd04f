"""GuestArchives: UploadArchive and DownloadArchive on a guest's agent channel.

The archive is never held whole: an upload goes out chunk by chunk within the agent's credit (its buffer stays
bounded by its window), a download grants credit back as gRPC takes each chunk. The agent extracts and builds the
archive (and checks every member): the relay only moves bytes.
"""

from __future__ import annotations

import asyncio

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.client_streams import drain
from services.common.errors import InvalidArgument
from services.common.validation import check_path
from services.relay.guest_io import failure, sandbox_id

MAX_CHUNK = 1 << 20


async def send_within_credit(stream, requests, final_kinds: tuple[str, ...]) -> agent_pb2.Frame:
    """Forwards the `data` of each request (after the header, already taken) as FileData frames, never beyond the
    credit the agent granted; returns the agent's last frame (one of `final_kinds`, or error). Stops early when the
    agent answers before the data ends (it failed: its answer says why)."""
    window = stream.channel.hello.initial_window if stream.channel.hello else 1 << 20
    credit = {"bytes": window}
    granted = asyncio.Event()

    async def watch_agent() -> agent_pb2.Frame:
        while True:
            frame = await stream.receive()
            kind = frame.WhichOneof("body")
            if kind == "window_update":
                credit["bytes"] += frame.window_update.increment
                granted.set()
            elif kind in final_kinds or kind == "error":
                return frame

    watcher = asyncio.create_task(watch_agent())
    try:
        async for message in requests:
            if message.WhichOneof("request") != "data":
                raise InvalidArgument("only data messages may follow the header")
            data = message.data
            if len(data) > MAX_CHUNK:
                raise InvalidArgument(f"a chunk is at most {MAX_CHUNK} bytes")
            while credit["bytes"] < min(len(data), window) and not watcher.done():
                granted.clear()
                waiting = asyncio.ensure_future(granted.wait())
                await asyncio.wait([watcher, waiting], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
            if watcher.done():
                break
            credit["bytes"] -= len(data)
            await stream.send(file_data=agent_pb2.FileData(data=data))
        if not watcher.done():
            await stream.send(file_data=agent_pb2.FileData(eof=True))
        return await watcher
    finally:
        watcher.cancel()


class GuestArchives:
    def __init__(self, open_stream) -> None:
        # vm id -> a new stream on that guest's channel.
        self.open_stream = open_stream

    async def upload(self, requests) -> api.UploadArchiveResponse:
        try:
            return await self._upload(requests)
        except Exception:
            await drain(requests)  # the caller learns why, not INTERNAL (see `drain`)
            raise

    async def _upload(self, requests) -> api.UploadArchiveResponse:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("request") != "header":
            raise InvalidArgument("the first UploadArchive message must carry the header")
        header = first.header
        check_path(header.path)
        stream = await self.open_stream(sandbox_id(header.sandbox))
        finished = False
        try:
            await stream.send(archive_extract_start=agent_pb2.ArchiveExtractStart(path=header.path))
            frame = await send_within_credit(stream, requests, ("archive_extracted",))
            finished = True
            if frame.WhichOneof("body") == "error":
                raise failure(frame)
            done = frame.archive_extracted
            return api.UploadArchiveResponse(entries=done.entries, bytes=done.bytes, sha256=done.sha256)
        finally:
            await stream.close(cancel=not finished)

    async def download(self, request: api.DownloadArchiveRequest):
        check_path(request.path)
        stream = await self.open_stream(sandbox_id(request.sandbox))
        finished = False
        try:
            await stream.send(archive_create_start=agent_pb2.ArchiveCreateStart(path=request.path))
            while True:
                frame = await stream.receive()
                kind = frame.WhichOneof("body")
                if kind == "error":
                    finished = True
                    raise failure(frame)
                if kind == "file_data":
                    if frame.file_data.data:
                        yield api.DownloadArchiveResponse(data=frame.file_data.data)
                        await stream.grant(len(frame.file_data.data))
                    if frame.file_data.eof:
                        finished = True
                        return
        finally:
            await stream.close(cancel=not finished)
