"""GuestFiles: WriteFile, ReadFile, ListDir, Stat, MakeDir, Remove and Rename on a guest's agent channel.

Writes go out only within the agent's credit (its buffer stays bounded by its window); reads grant credit
back as gRPC takes each chunk. Paths are the guest's: the agent checks them.
"""

from __future__ import annotations

from contextlib import aclosing

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument
from services.common.validation import check_mode, check_path, check_range, check_removable, check_rename
from services.relay.guest_io import failure, receive_data, sandbox_id, send_within_credit, to_file_info


class GuestFiles:
    def __init__(self, open_stream) -> None:
        # vm id -> a new stream on that guest's channel.
        self.open_stream = open_stream

    async def _single(self, sandbox: str, **body) -> agent_pb2.FileResult:
        stream = await self.open_stream(sandbox_id(sandbox))
        try:
            await stream.send(**body)
            frame = await stream.receive()
            if frame.WhichOneof("body") == "error":
                raise failure(frame)
            return frame.file_result
        finally:
            await stream.close(cancel=False)

    async def write(self, requests) -> api.WriteFileResponse:
        """A refusal ends the call only once the caller stopped sending (the error interceptor: `refuse`)."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("request") != "header":
            raise InvalidArgument("the first WriteFile message must carry the header")
        header = first.header
        check_path(header.path)
        check_mode(header.mode)
        stream = await self.open_stream(sandbox_id(header.sandbox))
        finished = False
        try:
            await stream.send(
                file_write_start=agent_pb2.FileWriteStart(
                    path=header.path, mode=header.mode, make_parents=header.make_parents, append=header.append
                )
            )
            frame = await send_within_credit(stream, requests, ("file_write_done",))
            finished = True
            if frame.WhichOneof("body") == "error":
                raise failure(frame)
            done = frame.file_write_done
            return api.WriteFileResponse(file=to_file_info(done.file), sha256=done.sha256)
        finally:
            await stream.close(cancel=not finished)

    async def read(self, request: api.ReadFileRequest):
        check_path(request.path)
        check_range(request.offset, request.length)
        stream = await self.open_stream(sandbox_id(request.sandbox))
        start = agent_pb2.FileReadStart(path=request.path, offset=request.offset, length=request.length)
        async with aclosing(receive_data(stream, file_read_start=start)) as chunks:  # closed when we are
            async for data in chunks:
                yield api.ReadFileResponse(data=data)

    async def list_dir(self, request: api.ListDirRequest) -> api.ListDirResponse:
        result = await self._single(request.sandbox, list_dir=agent_pb2.ListDirRequest(path=request.path))
        return api.ListDirResponse(entries=[to_file_info(e) for e in result.entries])

    async def stat(self, request: api.StatRequest) -> api.StatResponse:
        result = await self._single(request.sandbox, stat=agent_pb2.StatRequest(path=request.path))
        return api.StatResponse(file=to_file_info(result.entries[0]))

    async def make_dir(self, request: api.MakeDirRequest) -> api.MakeDirResponse:
        check_path(request.path)
        check_mode(request.mode)
        result = await self._single(
            request.sandbox,
            make_dir=agent_pb2.MakeDirRequest(path=request.path, parents=request.parents, mode=request.mode),
        )
        return api.MakeDirResponse(directory=to_file_info(result.entries[0]))

    async def remove(self, request: api.RemoveRequest) -> api.RemoveResponse:
        check_removable(request.path)
        await self._single(
            request.sandbox, remove=agent_pb2.RemoveRequest(path=request.path, recursive=request.recursive)
        )
        return api.RemoveResponse()

    async def rename(self, request: api.RenameRequest) -> api.RenameResponse:
        check_rename(request.source, request.destination)
        result = await self._single(
            request.sandbox,
            rename=agent_pb2.RenameRequest(
                source=request.source, destination=request.destination, overwrite=request.overwrite
            ),
        )
        return api.RenameResponse(file=to_file_info(result.entries[0]))
