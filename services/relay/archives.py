"""GuestArchives: UploadArchive and DownloadArchive on a guest's agent channel.

The archive is never held whole: an upload goes out chunk by chunk within the agent's credit (its buffer stays
bounded by its window), a download grants credit back as gRPC takes each chunk. The agent extracts and builds the
archive (and checks every member): the relay only moves bytes.
"""

from __future__ import annotations

from contextlib import aclosing

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument
from services.common.validation import check_path
from services.relay.guest_io import failure, receive_data, sandbox_id, send_within_credit


class GuestArchives:
    def __init__(self, open_stream) -> None:
        # vm id -> a new stream on that guest's channel.
        self.open_stream = open_stream

    async def upload(self, requests) -> api.UploadArchiveResponse:
        """A refusal ends the call only once the caller stopped sending (the error interceptor: `refuse`)."""
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
        start = agent_pb2.ArchiveCreateStart(path=request.path)
        async with aclosing(receive_data(stream, archive_create_start=start)) as chunks:  # closed when we are
            async for data in chunks:
                yield api.DownloadArchiveResponse(data=data)
