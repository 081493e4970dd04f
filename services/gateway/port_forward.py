"""PortForwardServicer: the public PortForwardService, each connection handed to the relay of the sandbox's node
(which carries it over the agent channel), followed only while that node lives."""

from __future__ import annotations

from microvm.sandbox.v1 import port_forward_service_pb2_grpc
from services.gateway.data_plane import DataPlane, on_node
from services.relay.port_forward import check_target


class PortForwardServicer(port_forward_service_pb2_grpc.PortForwardServiceServicer):
    def __init__(self, data: DataPlane) -> None:
        self.data = data

    async def ForwardPort(self, request_iterator, context):
        first, record = await self.data.opening(request_iterator, "target", check_target)
        forwarded = on_node(first, record, "target")

        async def upstream():
            yield forwarded
            async for message in request_iterator:
                yield message

        stub = port_forward_service_pb2_grpc.PortForwardServiceStub(self.data.nodes.relay_channel(record.node))
        call = stub.ForwardPort(upstream(), timeout=context.time_remaining())
        async for event in self.data.follow(record, call):
            yield event
