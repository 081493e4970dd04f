"""RelayService handlers."""

from __future__ import annotations

from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from services.common.errors import Unimplemented


class RelayServicer(relay_pb2_grpc.RelayServiceServicer):

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

    async def PingAgent(self, request, context):
        raise Unimplemented("PingAgent")

    async def SetGuestIdentity(self, request, context):
        raise Unimplemented("SetGuestIdentity")

    async def CloseChannel(self, request, context):
        raise Unimplemented("CloseChannel")


async def wire(server, context) -> list[str]:
    relay_pb2_grpc.add_RelayServiceServicer_to_server(RelayServicer(), server)
    return [relay_pb2.DESCRIPTOR.services_by_name["RelayService"].full_name]
