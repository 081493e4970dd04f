"""Wiring and handlers of the network service (NetworkService): one per node, see node.py."""

from __future__ import annotations

from microvm.network.v1 import network_pb2, network_pb2_grpc
from services.common.dependencies import command_dependency
from services.common.errors import FailedPrecondition
from services.common.records import ADDRESSES, ATTACHMENTS, Records
from services.common.server import ServiceContext
from services.common.settings import NetworkSettings
from services.network.metrics import NetworkMetrics
from services.network.node import NodeNetwork


class NetworkServicer(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, network: NodeNetwork | None) -> None:
        self._network = network

    @property
    def network(self) -> NodeNetwork:
        if self._network is None:
            raise FailedPrecondition(
                "sandbox networking is turned off on this installation (networking: false)",
                reason="NETWORKING_DISABLED",
            )
        return self._network

    async def AttachSandbox(self, request, context):
        attachment = await self.network.attach(request.sandbox_id, request.policy, request.from_sandbox_id)
        return network_pb2.AttachSandboxResponse(attachment=attachment.to_proto())

    async def DetachSandbox(self, request, context):
        await self.network.detach(request.sandbox_id)
        return network_pb2.DetachSandboxResponse()

    async def SetEgressPolicy(self, request, context):
        attachment = await self.network.set_policy(request.sandbox_id, request.policy)
        return network_pb2.SetEgressPolicyResponse(attachment=attachment.to_proto())

    async def ExposePort(self, request, context):
        port = await self.network.expose(
            request.sandbox_id, request.guest_port, request.host_address, request.host_port
        )
        return network_pb2.ExposePortResponse(port=port.to_proto())

    async def UnexposePort(self, request, context):
        removed = await self.network.unexpose(
            request.sandbox_id, request.guest_port, request.host_address, request.host_port
        )
        return network_pb2.UnexposePortResponse(ports=[p.to_proto() for p in removed])

    async def ListAttachments(self, request, context):
        return network_pb2.ListAttachmentsResponse(attachments=[a.to_proto() for a in await self.network.attachments()])


async def wire(server, context: ServiceContext[NetworkSettings]) -> list[str]:
    network = None
    node = context.common.node
    if context.common.networking:
        context.dependencies.append(command_dependency("nftables", ["nft", "list", "tables"]))
        records = Records(context.etcd)
        await records.migrate(ATTACHMENTS, node)
        await records.migrate(ADDRESSES, node)
        network = NodeNetwork(context.settings, context.etcd, node)
        await network.start()
        NetworkMetrics(context.metrics, network)
        context.every(context.settings.reconcile_interval_seconds, network.reconcile, "network-reconcile")
        context.on_shutdown.append(network.close)
    context.registration_metadata.update(networking=str(context.common.networking).lower())
    network_pb2_grpc.add_NetworkServiceServicer_to_server(NetworkServicer(network), server)
    return [network_pb2.DESCRIPTOR.services_by_name["NetworkService"].full_name]
