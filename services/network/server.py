"""Wiring of the network service. Bridge/TAP, address allocation, egress and ports come in the
networking issue; until then every RPC answers UNIMPLEMENTED naming the capability."""

from __future__ import annotations

from microvm.network.v1 import network_pb2, network_pb2_grpc
from services.common.errors import Unimplemented
from services.common.server import ServiceContext
from services.common.settings import NetworkSettings


class NetworkServicer(network_pb2_grpc.NetworkServiceServicer):
    async def AttachSandbox(self, request, context):
        raise Unimplemented("sandbox networking (bridge, TAP, address allocation)")

    async def DetachSandbox(self, request, context):
        raise Unimplemented("sandbox networking (bridge, TAP, address allocation)")

    async def SetEgressPolicy(self, request, context):
        raise Unimplemented("egress policy")

    async def ExposePort(self, request, context):
        raise Unimplemented("port exposure")

    async def ListAttachments(self, request, context):
        raise Unimplemented("sandbox networking (bridge, TAP, address allocation)")


async def wire(server, context: ServiceContext[NetworkSettings]) -> list[str]:
    network_pb2_grpc.add_NetworkServiceServicer_to_server(NetworkServicer(), server)
    return [network_pb2.DESCRIPTOR.services_by_name["NetworkService"].full_name]
