"""SandboxService handlers. Capabilities not built yet answer UNIMPLEMENTED, naming them."""

from __future__ import annotations

from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.common.errors import Unimplemented


class SandboxServicer(sandbox_service_pb2_grpc.SandboxServiceServicer):
    def __init__(self, context) -> None:
        self._context = context

    async def CreateSandbox(self, request, context):
        raise Unimplemented("CreateSandbox")

    async def GetSandbox(self, request, context):
        raise Unimplemented("GetSandbox")

    async def ListSandboxes(self, request, context):
        raise Unimplemented("ListSandboxes")

    async def UpdateSandbox(self, request, context):
        raise Unimplemented("UpdateSandbox")

    async def DeleteSandbox(self, request, context):
        raise Unimplemented("DeleteSandbox")

    async def Exec(self, request, context):
        raise Unimplemented("Exec")
        yield

    async def ExecInteractive(self, request_iterator, context):
        raise Unimplemented("ExecInteractive")
        yield

    async def WriteFile(self, request_iterator, context):
        raise Unimplemented("WriteFile")

    async def ReadFile(self, request, context):
        raise Unimplemented("ReadFile")
        yield

    async def ListDir(self, request, context):
        raise Unimplemented("ListDir")

    async def Stat(self, request, context):
        raise Unimplemented("Stat")

    async def MakeDir(self, request, context):
        raise Unimplemented("MakeDir")

    async def Remove(self, request, context):
        raise Unimplemented("Remove")

    async def PauseSandbox(self, request, context):
        raise Unimplemented("PauseSandbox")

    async def ResumeSandbox(self, request, context):
        raise Unimplemented("ResumeSandbox")

    async def CreateSnapshot(self, request, context):
        raise Unimplemented("CreateSnapshot")

    async def GetSnapshot(self, request, context):
        raise Unimplemented("GetSnapshot")

    async def ListSnapshots(self, request, context):
        raise Unimplemented("ListSnapshots")

    async def DeleteSnapshot(self, request, context):
        raise Unimplemented("DeleteSnapshot")

    async def RestoreSnapshot(self, request, context):
        raise Unimplemented("RestoreSnapshot")

    async def ForkSandbox(self, request, context):
        raise Unimplemented("ForkSandbox")

    async def ExposePort(self, request, context):
        raise Unimplemented("ExposePort")
