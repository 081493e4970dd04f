"""WriteFile, ReadFile, ListDir, Stat, MakeDir, Remove: file operations relayed to the guest agent."""

from __future__ import annotations

from microvm.relay.v1 import relay_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument

MAX_CHUNK = 1 << 20


class FileHandlers:
    """Mixin of SandboxServicer."""

    async def WriteFile(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "header":
            raise InvalidArgument("the first WriteFile message must carry the header")
        record = await self.running_record(first.header.sandbox)

        async def upstream():
            yield relay_pb2.WriteFileRequest(target=self.agent_target(record), request=first)
            async for message in request_iterator:
                if message.WhichOneof("request") != "data":
                    raise InvalidArgument("only data messages may follow the WriteFile header")
                if len(message.data) > MAX_CHUNK:
                    raise InvalidArgument(f"a WriteFile chunk is at most {MAX_CHUNK} bytes")
                yield relay_pb2.WriteFileRequest(request=message)

        reply = await self.placement.relay().WriteFile(upstream(), timeout=context.time_remaining())
        return reply.response

    async def ReadFile(self, request, context):
        record = await self.running_record(request.sandbox)
        if request.offset < 0 or request.length < 0:
            raise InvalidArgument("offset and length must not be negative")
        call = self.placement.relay().ReadFile(
            relay_pb2.ReadFileRequest(target=self.agent_target(record), request=request),
            timeout=context.time_remaining(),
        )
        async for chunk in call:
            yield api.ReadFileResponse(data=chunk.data)

    async def ListDir(self, request, context):
        record = await self.running_record(request.sandbox)
        reply = await self.placement.relay().ListDir(
            relay_pb2.ListDirRequest(target=self.agent_target(record), path=request.path),
            timeout=context.time_remaining(),
        )
        return api.ListDirResponse(entries=reply.entries)

    async def Stat(self, request, context):
        record = await self.running_record(request.sandbox)
        reply = await self.placement.relay().Stat(
            relay_pb2.StatRequest(target=self.agent_target(record), path=request.path), timeout=context.time_remaining()
        )
        return api.StatResponse(file=reply.file)

    async def MakeDir(self, request, context):
        record = await self.running_record(request.sandbox)
        reply = await self.placement.relay().MakeDir(
            relay_pb2.MakeDirRequest(
                target=self.agent_target(record), path=request.path, parents=request.parents, mode=request.mode
            ),
            timeout=context.time_remaining(),
        )
        return api.MakeDirResponse(directory=reply.directory)

    async def Remove(self, request, context):
        record = await self.running_record(request.sandbox)
        await self.placement.relay().Remove(
            relay_pb2.RemoveRequest(target=self.agent_target(record), path=request.path, recursive=request.recursive),
            timeout=context.time_remaining(),
        )
        return api.RemoveResponse()
