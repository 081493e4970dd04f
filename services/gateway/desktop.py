"""DesktopServicer: the public DesktopService, each call handed to the relay of the sandbox's node (which speaks to
the desktop server in the guest). As for exec and files, the gateway checks who may reach which sandbox and that it
runs, and names the sandbox as its node knows it."""

from __future__ import annotations

from microvm.sandbox.v1 import desktop_service_pb2_grpc
from services.gateway.data_plane import DataPlane, on_node
from services.gateway.desktop_live import DesktopLive


class DesktopServicer(desktop_service_pb2_grpc.DesktopServiceServicer):
    def __init__(self, data: DataPlane, live: DesktopLive) -> None:
        self.data, self.live = data, live

    async def CreateDesktopStream(self, request, context):
        return await self.live.create(request)

    async def _forward(self, method: str, request, context):
        record = await self.data.sandboxes.running(request.sandbox)
        stub = desktop_service_pb2_grpc.DesktopServiceStub(self.data.nodes.relay_channel(record.node))
        return await getattr(stub, method)(on_node(request, record), timeout=context.time_remaining())

    async def Screenshot(self, request, context):
        return await self._forward("Screenshot", request, context)

    async def GetDesktop(self, request, context):
        return await self._forward("GetDesktop", request, context)

    async def DesktopAction(self, request, context):
        return await self._forward("DesktopAction", request, context)

    async def WaitForScreen(self, request, context):
        return await self._forward("WaitForScreen", request, context)

    async def StartRecording(self, request, context):
        return await self._forward("StartRecording", request, context)

    async def StopRecording(self, request, context):
        return await self._forward("StopRecording", request, context)
