"""CodeOps and CodeServicer: the public CodeService, each call handed to the relay of the sandbox's node.

As with exec and files, the gateway checks who may reach which sandbox and that it runs, names the sandbox as its
node knows it, and follows a run only while that node lives; the relay speaks to the guest's code server. A run
gets the sandbox's environment under its own (the kernels were started before the sandbox had one: inside the
template snapshot).
"""

from __future__ import annotations

from microvm.sandbox.v1 import code_service_pb2 as api
from microvm.sandbox.v1 import code_service_pb2_grpc
from services.gateway.data_plane import DataPlane, on_node


class CodeOps:
    def __init__(self, data: DataPlane) -> None:
        self.data = data
        self.sandboxes, self.nodes = data.sandboxes, data.nodes

    def _relay(self, node: str) -> code_service_pb2_grpc.CodeServiceStub:
        return code_service_pb2_grpc.CodeServiceStub(self.nodes.relay_channel(node))

    async def run(self, request: api.RunCodeRequest, deadline: float | None):
        record = await self.sandboxes.running(request.sandbox)
        forwarded = on_node(request, record)
        for name, value in record.env.items():
            if name not in forwarded.env:
                forwarded.env[name] = value
        call = self._relay(record.node).RunCode(forwarded, timeout=deadline)
        async for event in self.data.follow(record, call):
            yield event

    async def unary(self, method: str, request, deadline: float | None):
        """CreateCodeContext, ListCodeContexts, RestartCodeContext, DeleteCodeContext, InterruptCode."""
        record = await self.sandboxes.running(request.sandbox)
        return await getattr(self._relay(record.node), method)(on_node(request, record), timeout=deadline)


class CodeServicer(code_service_pb2_grpc.CodeServiceServicer):
    def __init__(self, code: CodeOps) -> None:
        self.code = code

    async def RunCode(self, request, context):
        async for event in self.code.run(request, context.time_remaining()):
            yield event

    async def CreateCodeContext(self, request, context):
        return await self.code.unary("CreateCodeContext", request, context.time_remaining())

    async def ListCodeContexts(self, request, context):
        return await self.code.unary("ListCodeContexts", request, context.time_remaining())

    async def RestartCodeContext(self, request, context):
        return await self.code.unary("RestartCodeContext", request, context.time_remaining())

    async def DeleteCodeContext(self, request, context):
        return await self.code.unary("DeleteCodeContext", request, context.time_remaining())

    async def InterruptCode(self, request, context):
        return await self.code.unary("InterruptCode", request, context.time_remaining())
