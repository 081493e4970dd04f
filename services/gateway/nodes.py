"""ClusterNodes: the nodes as the gateway sees them, and calls to the services of one node.

A node is what its compute service reports (`/microvm/nodes/<node>`), what operators decided about it
(`/microvm/node-controls/<node>`, written here), whether it is alive (its compute service is registered, under
a lease) and what the sandbox records place on it. Calls to a node's services ride out a restart of the
service: a call that never reached a server is tried again on the node's newest instance for a few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from microvm.compute.v1 import compute_pb2_grpc
from microvm.network.v1 import network_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from microvm.snapshot.v1 import snapshot_pb2_grpc
from microvm.types.v1 import node_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common import deadlines
from services.common.errors import NotFound, Unavailable
from services.common.records import NODE_CONTROLS, NODES, Records, Stored
from services.common.server import ServiceContext

T = TypeVar("T")


def holds_capacity(sandbox: sandbox_types.SandboxRecord) -> bool:
    """Every sandbox on a node holds its share until it is deleted, except a FAILED one (its VM is gone)."""
    return sandbox.state != sandbox_types.SANDBOX_RECORD_STATE_FAILED


@dataclass
class NodeView:
    name: str
    record: node_pb2.NodeRecord
    control: node_pb2.NodeControl
    alive: bool
    vcpus_allocated: int = 0
    memory_mib_allocated: int = 0
    sandboxes: list[sandbox_types.SandboxRecord] = field(default_factory=list)

    @property
    def schedulable(self) -> bool:
        return self.alive and not self.control.cordoned and not self.control.draining

    @property
    def vcpus_free(self) -> int:
        return self.record.capacity.vcpus - self.vcpus_allocated

    @property
    def memory_mib_free(self) -> int:
        return self.record.capacity.memory_mib - self.memory_mib_allocated


class ClusterNodes:
    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.records = Records(context.etcd)

    def alive(self, node: str) -> bool:
        return any(i.node == node for i in self.context.directory.instances("compute"))

    async def until_any_compute(self, timeout: float) -> None:
        """Returns once some compute service is registered, or after `timeout` seconds: a create that arrives while
        every compute service is restarting (or just before the first registers) waits for one, as calls to a
        node's services ride out its restart, instead of failing at once."""
        if self.context.directory.instances("compute"):
            return
        try:
            await self.context.directory.wait_for("compute", timeout)
        except TimeoutError:
            pass  # placement then says no node is answering

    def compute_instance_key(self, node: str) -> str:
        return self.context.directory.newest("compute", node).key

    async def views(self, sandboxes: list[sandbox_types.SandboxRecord]) -> dict[str, NodeView]:
        """Every node that ever registered, with what `sandboxes` hold on it."""
        return self.holding(await self.registered(), sandboxes)

    async def registered(self) -> dict[str, NodeView]:
        """Every node that ever registered, with nothing counted on it yet (its two lists read at once)."""
        return self.registered_from(*await asyncio.gather(self.records.list(NODE_CONTROLS), self.records.list(NODES)))

    def registered_from(self, controls: list[Stored], nodes: list[Stored]) -> dict[str, NodeView]:
        """The views of `nodes` (NODES records) with their `controls` (NODE_CONTROLS records), as read."""
        controls = {s.parts[0]: s.message for s in controls}
        return {
            s.parts[0]: NodeView(
                s.parts[0], s.message, controls.get(s.parts[0], node_pb2.NodeControl()), self.alive(s.parts[0])
            )
            for s in nodes
        }

    @staticmethod
    def holding(views: dict[str, NodeView], sandboxes: list[sandbox_types.SandboxRecord]) -> dict[str, NodeView]:
        """`views` with what `sandboxes` hold counted on their nodes."""
        for sandbox in sandboxes:
            view = views.get(sandbox.node)
            if view is not None and holds_capacity(sandbox):
                view.vcpus_allocated += sandbox.vcpus
                view.memory_mib_allocated += sandbox.memory_mib
                view.sandboxes.append(sandbox)
        return views

    async def view(self, node: str, sandboxes: list[sandbox_types.SandboxRecord]) -> NodeView:
        view = (await self.views(sandboxes)).get(node)
        if view is None:
            raise NotFound(
                f"node {node} does not exist (it never registered)", reason="NODE_NOT_FOUND", metadata={"node": node}
            )
        return view

    async def set_control(self, node: str, **changes) -> node_pb2.NodeControl:
        stored = await self.records.get(NODE_CONTROLS, node)
        control = stored.message if stored else node_pb2.NodeControl()
        for name, value in changes.items():
            setattr(control, name, value)
        control.update_time.GetCurrentTime()
        await self.records.put(NODE_CONTROLS, control, node)
        return control

    # --- calls to one node's services ---------------------------------------------------------------
    async def _on(self, kind: str, node: str, stub_class, invoke: Callable[..., Awaitable[T]]) -> T:
        if not self.alive(node) and kind == "compute":
            raise Unavailable(
                f"node {node} is not answering (its lease ran out)", reason="NODE_UNAVAILABLE", metadata={"node": node}
            )
        return await self.context.on_newest(kind, node, stub_class, invoke, retry_for=deadlines.RESTART_WAIT)

    async def on_compute(self, node: str, invoke: Callable[[compute_pb2_grpc.ComputeServiceStub], Awaitable[T]]) -> T:
        return await self._on("compute", node, compute_pb2_grpc.ComputeServiceStub, invoke)

    async def on_network(self, node: str, invoke: Callable[[network_pb2_grpc.NetworkServiceStub], Awaitable[T]]) -> T:
        return await self._on("network", node, network_pb2_grpc.NetworkServiceStub, invoke)

    async def on_snapshot_store(
        self, node: str, invoke: Callable[[snapshot_pb2_grpc.SnapshotStoreServiceStub], Awaitable[T]]
    ) -> T:
        return await self._on("snapshot", node, snapshot_pb2_grpc.SnapshotStoreServiceStub, invoke)

    def snapshot_store(self, nodes: list[str] | None = None) -> snapshot_pb2_grpc.SnapshotStoreServiceStub:
        """A snapshot store for record-level calls (any node's serves the cluster's records); the first of `nodes`
        that has one registered, else any."""
        for node in nodes or []:
            try:
                instance = self.context.directory.newest("snapshot", node)
                break
            except Unavailable:
                continue
        else:
            instance = self.context.directory.newest("snapshot")
        return snapshot_pb2_grpc.SnapshotStoreServiceStub(self.context.channel(instance.address))

    def relay(self, node: str) -> sandbox_service_pb2_grpc.SandboxServiceStub:
        """The data plane of `node`: its relay serves the exec and file methods of the public API."""
        return sandbox_service_pb2_grpc.SandboxServiceStub(self.relay_channel(node))

    def relay_channel(self, node: str):
        """The channel to `node`'s relay (it serves the public data-plane services: exec, files, code)."""
        return self.context.channel(self.context.directory.newest("relay", node).address)


def not_found_code(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.NOT_FOUND
