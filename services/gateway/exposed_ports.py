"""Exposed ports of sandboxes (ExposePort, UnexposePort): translated into calls on the network service of the
sandbox's node, which enforces where ports may be exposed (services/network/exposure.py), and remembered in the
sandbox record with a compare-and-swap (a change racing a delete never brings the sandbox back)."""

from __future__ import annotations

from microvm.network.v1 import network_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import network_pb2 as network_types
from services.common import deadlines
from services.common.errors import FailedPrecondition, NotFound
from services.gateway.records import SandboxRecord, convert, name_of
from services.gateway.sandbox_requests import parse_name
from services.gateway.sandboxes import Sandboxes
from services.network.exposure import check_ports, parse_host_address


class ExposedPorts:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes, self.store, self.nodes = sandboxes, sandboxes.store, sandboxes.nodes
        self.networking = sandboxes.context.common.networking

    async def _record(self, name: str) -> SandboxRecord:
        record = await self.store.get(parse_name(name))
        if not self.networking:
            raise FailedPrecondition(
                "this installation runs without networking (networking: false)", reason="NETWORKING_DISABLED"
            )
        return record

    async def expose(self, request: api.ExposePortRequest) -> api.ExposePortResponse:
        record = await self._record(request.sandbox)
        check_ports(request.guest_port, request.host_port)
        await self.sandboxes.require_running_or_paused(record)
        expose = network_pb2.ExposePortRequest(
            sandbox_id=record.id,
            guest_port=request.guest_port,
            host_address=parse_host_address(request.host_address),
            host_port=request.host_port,
        )
        reply = await self.nodes.on_network(record.node, lambda n: n.ExposePort(expose, timeout=deadlines.CONTROL))

        def remember(current: SandboxRecord) -> None:
            if reply.port not in current.exposed_ports:
                current.exposed_ports.append(reply.port)

        await self.store.change(record, remember)
        return api.ExposePortResponse(port=convert(reply.port, sandbox_pb2.ExposedPort))

    async def unexpose(self, request: api.UnexposePortRequest) -> api.UnexposePortResponse:
        """Closes the matching listeners on the sandbox's node, then forgets them in the record. A mapping the record
        still lists but the node no longer has (a retry after a failure between the two steps) is forgotten all the
        same; NOT_FOUND only when neither has a match."""
        record = await self._record(request.sandbox)
        check_ports(request.guest_port, request.host_port)
        host_address = parse_host_address(request.host_address)

        def matches(port: network_types.ExposedPort) -> bool:
            return (
                port.guest_port == request.guest_port
                and host_address in ("", port.host_address)
                and request.host_port in (0, port.host_port)
            )

        removed: list[network_types.ExposedPort] = []
        if record.node:
            unexpose = network_pb2.UnexposePortRequest(
                sandbox_id=record.id,
                guest_port=request.guest_port,
                host_address=host_address,
                host_port=request.host_port,
            )
            reply = await self.nodes.on_network(
                record.node, lambda n: n.UnexposePort(unexpose, timeout=deadlines.CONTROL)
            )
            removed.extend(reply.ports)

        def forget(current: SandboxRecord) -> None:
            kept = []
            for port in current.exposed_ports:
                if not matches(port):
                    kept.append(port)
                elif port not in removed:
                    removed.append(network_types.ExposedPort.FromString(port.SerializeToString()))
            del current.exposed_ports[:]
            current.exposed_ports.extend(kept)

        await self.store.change(record, forget)
        if not removed:
            raise NotFound(
                f"sandbox {name_of(record)} has no exposed guest port {request.guest_port} on host "
                f"{host_address or '*'}:{request.host_port or '*'}",
                reason="EXPOSED_PORT_NOT_FOUND",
                metadata={"sandbox": f"sandboxes/{name_of(record)}"},
            )
        return api.UnexposePortResponse(ports=[convert(p, sandbox_pb2.ExposedPort) for p in removed])
