"""SandboxPlacement: which compute node gets a new sandbox, and how to reach a sandbox's node."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from microvm.network.v1 import network_pb2_grpc
from microvm.relay.v1 import relay_pb2_grpc
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.registry import ServiceInstance
from services.common.server import ServiceContext

log = structlog.get_logger()


RESTART_WAIT_SECONDS = 10.0


class NodeCompute:
    """The compute service of one node, riding out its restarts (its successor registers only after
    re-adopting the VMs): a call that never reached a server is tried again for a few seconds."""

    def __init__(self, context: ServiceContext, node: str) -> None:
        self.context, self.node = context, node

    def __getattr__(self, method: str):
        async def call(request, timeout: float | None = None):
            return await self.context.call_newest(
                "compute",
                self.node,
                compute_pb2_grpc.ComputeServiceStub,
                method,
                request,
                timeout=timeout,
                retry_for=RESTART_WAIT_SECONDS,
            )

        return call


class SandboxPlacement:
    def __init__(self, context: ServiceContext) -> None:
        self.context = context

    def compute(self, node: str) -> NodeCompute:
        return NodeCompute(self.context, node)

    def network(self, node: str) -> network_pb2_grpc.NetworkServiceStub:
        return network_pb2_grpc.NetworkServiceStub(
            self.context.channel(self.context.directory.newest("network", node).address)
        )

    def channel_to(self, kind: str):
        """A channel to the newest registered instance of a service kind (relay, auth, snapshot)."""
        return self.context.channel(self.context.directory.newest(kind).address)

    def relay(self) -> relay_pb2_grpc.RelayServiceStub:
        return relay_pb2_grpc.RelayServiceStub(self.channel_to("relay"))

    async def choose_node(self, template: str, vcpus: int, memory_mib: int) -> str:
        """The node with the most free memory that has the template and room for the sandbox."""
        instances = self.context.directory.instances("compute")
        if not instances:
            raise Unavailable("no compute node is registered", reason="NO_COMPUTE_NODES")

        async def capacity(instance: ServiceInstance):
            stub = compute_pb2_grpc.ComputeServiceStub(self.context.channel(instance.address))
            try:
                return await stub.GetNodeCapacity(compute_pb2.GetNodeCapacityRequest(), timeout=3)
            except grpc.aio.AioRpcError as exc:
                log.warning("node_capacity_unavailable", instance=instance.instance_id, code=exc.code().name)
                return None

        reports = [r for r in await asyncio.gather(*(capacity(i) for i in instances)) if r is not None]
        deadline = asyncio.get_running_loop().time() + RESTART_WAIT_SECONDS
        while not reports and asyncio.get_running_loop().time() < deadline:
            # Every registered instance refused: a compute restarting (its successor registers shortly).
            await asyncio.sleep(0.3)
            reports = [
                r
                for r in await asyncio.gather(*(capacity(i) for i in self.context.directory.instances("compute")))
                if r is not None
            ]
        if not reports:
            raise Unavailable("no compute node answered", reason="NO_COMPUTE_NODES")
        with_template = [r for r in reports if template in r.templates]
        if not with_template:
            raise NotFound(
                f"template {template!r} is not built on any compute node",
                reason="TEMPLATE_NOT_FOUND",
                metadata={"template": template},
            )
        max_vcpus = max(r.max_vcpus_per_vm for r in with_template)
        max_memory = max(r.max_memory_mib_per_vm for r in with_template)
        if vcpus > max_vcpus:
            raise InvalidArgument(f"vcpus must be between 1 and {max_vcpus}, got {vcpus}", reason="VCPUS_OUT_OF_RANGE")
        if memory_mib > max_memory:
            raise InvalidArgument(
                f"memory_mib must be between 128 and {max_memory}, got {memory_mib}", reason="MEMORY_OUT_OF_RANGE"
            )
        fitting = [
            r
            for r in with_template
            if r.vcpus_total - r.vcpus_used >= vcpus and r.memory_mib_total - r.memory_mib_used >= memory_mib
        ]
        if not fitting:
            raise ResourceExhausted(
                f"no compute node has {vcpus} vCPUs and {memory_mib} MiB free", reason="NO_CAPACITY"
            )
        return max(fitting, key=lambda r: r.memory_mib_total - r.memory_mib_used).node
