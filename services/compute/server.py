"""ComputeService handlers."""

from __future__ import annotations

from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from services.common.errors import Unimplemented


class ComputeServicer(compute_pb2_grpc.ComputeServiceServicer):

    async def CreateVm(self, request, context):
        raise Unimplemented("CreateVm")

    async def GetVm(self, request, context):
        raise Unimplemented("GetVm")

    async def ListVms(self, request, context):
        raise Unimplemented("ListVms")

    async def StopVm(self, request, context):
        raise Unimplemented("StopVm")

    async def DeleteVm(self, request, context):
        raise Unimplemented("DeleteVm")

    async def PauseVm(self, request, context):
        raise Unimplemented("PauseVm")

    async def ResumeVm(self, request, context):
        raise Unimplemented("ResumeVm")

    async def SnapshotVm(self, request, context):
        raise Unimplemented("SnapshotVm")

    async def RestoreVm(self, request, context):
        raise Unimplemented("RestoreVm")

    async def GetNodeCapacity(self, request, context):
        raise Unimplemented("GetNodeCapacity")


async def wire(server, context) -> list[str]:
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(ComputeServicer(), server)
    return [compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name]
