"""SandboxServicer: the public SandboxService. Each RPC's handler lives in the module of its group."""

from __future__ import annotations

from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.common.errors import Unimplemented
from services.common.server import ServiceContext
from services.gateway.exec import ExecHandlers
from services.gateway.files import FileHandlers
from services.gateway.lifecycle import SandboxLifecycle
from services.gateway.placement import SandboxPlacement
from services.gateway.records import SandboxStore

_PAUSE = "pause and resume"
_SNAPSHOTS = "snapshots, restore and fork"


class SandboxServicer(SandboxLifecycle, ExecHandlers, FileHandlers,
                      sandbox_service_pb2_grpc.SandboxServiceServicer):
    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.store = SandboxStore(context.etcd)
        self.placement = SandboxPlacement(context)

    async def PauseSandbox(self, request, context):
        raise Unimplemented(_PAUSE)

    async def ResumeSandbox(self, request, context):
        raise Unimplemented(_PAUSE)

    async def CreateSnapshot(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def GetSnapshot(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def ListSnapshots(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def DeleteSnapshot(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def RestoreSnapshot(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def ForkSandbox(self, request, context):
        raise Unimplemented(_SNAPSHOTS)

    async def ExposePort(self, request, context):
        raise Unimplemented("port exposure (sandbox networking)")
