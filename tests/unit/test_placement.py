"""Placement: which node a sandbox goes to, and that two deciders never oversubscribe a node."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest

from microvm.types.v1 import node_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.records import NODES, Records
from services.gateway.nodes import ClusterNodes, NodeView
from services.gateway.placement import SandboxPlacement, choose
from services.gateway.records import SandboxStore
from tests.etcd import CountingEtcd


def node(
    name: str,
    alive: bool = True,
    vcpus: int = 8,
    memory: int = 8192,
    labels=None,
    templates=("default",),
    warm=(),
    cordoned: bool = False,
    sandboxes=(),
) -> NodeView:
    record = node_pb2.NodeRecord(
        name=name,
        labels=labels or {},
        templates=templates,
        capacity=node_pb2.NodeCapacity(vcpus=vcpus, memory_mib=memory, max_vcpus_per_vm=8, max_memory_mib_per_vm=8192),
        template_snapshots=[node_pb2.TemplateSnapshotRef(template=t, vcpus=1, memory_mib=256) for t in warm],
    )
    view = NodeView(name, record, node_pb2.NodeControl(cordoned=cordoned), alive)
    for sandbox in sandboxes:
        view.sandboxes.append(sandbox)
        view.vcpus_allocated += sandbox.vcpus
        view.memory_mib_allocated += sandbox.memory_mib
    return view


def sandbox(tenant: str = "t1", vcpus: int = 1, memory: int = 256, template: str = "default", selector=None):
    return sandbox_types.SandboxRecord(
        id=f"sbx-{uuid.uuid4().hex[:8]}",
        tenant=tenant,
        vcpus=vcpus,
        memory_mib=memory,
        template=template,
        node_selector=selector or {},
    )


def views(*nodes: NodeView) -> dict[str, NodeView]:
    return {n.name: n for n in nodes}


def test_the_node_with_more_room_wins():
    assert choose(views(node("a", memory=4096), node("b", memory=8192)), sandbox()) == "b"


def test_a_node_holding_the_template_snapshot_is_preferred_at_equal_room():
    assert choose(views(node("a"), node("b", warm=("default",))), sandbox()) == "b"


def test_a_tenants_sandboxes_spread_over_the_nodes():
    mine = [sandbox("t1") for _ in range(2)]
    theirs = [sandbox("t2") for _ in range(2)]
    assert choose(views(node("a", sandboxes=mine), node("b", sandboxes=theirs)), sandbox("t1")) == "b"


def test_a_sandbox_held_to_one_node_goes_there_or_nowhere():
    # A fork's clones restored from a snapshot kept on their source's node (services/gateway/forks.py).
    cluster = views(node("roomy"), node("source", memory=2048, sandboxes=[sandbox(memory=1024)]))
    assert choose(cluster, sandbox()) == "roomy"
    assert choose(cluster, sandbox(), only_node="source") == "source"
    with pytest.raises(ResourceExhausted):
        choose(cluster, sandbox(memory=2048), only_node="source")
    with pytest.raises(Unavailable):
        choose(cluster, sandbox(), only_node="gone")


def test_labels_select_nodes():
    cluster = views(node("a", labels={"zone": "x"}), node("b", labels={"zone": "y"}, memory=2048))
    assert choose(cluster, sandbox(selector={"zone": "y"})) == "b"
    with pytest.raises(FailedPrecondition, match="zone=z"):
        choose(cluster, sandbox(selector={"zone": "z"}))


def test_lost_cordoned_and_full_nodes_are_skipped():
    full = node("full", vcpus=1, sandboxes=[sandbox()])
    assert (
        choose(
            views(
                node("lost", alive=False, memory=99999),
                node("cordoned", cordoned=True, memory=99999),
                full,
                node("ok", memory=1024),
            ),
            sandbox(),
        )
        == "ok"
    )


@pytest.mark.parametrize(
    "cluster,request_,error",
    [
        (views(), sandbox(), Unavailable),
        (views(node("a", alive=False)), sandbox(), Unavailable),
        (views(node("a")), sandbox(template="nope"), NotFound),
        (views(node("a")), sandbox(vcpus=64), InvalidArgument),
        (views(node("a", cordoned=True)), sandbox(), FailedPrecondition),
        (views(node("a", vcpus=2, sandboxes=[sandbox(vcpus=2)])), sandbox(), ResourceExhausted),
    ],
)
def test_why_nothing_fits_is_said_with_the_right_status(cluster, request_, error):
    with pytest.raises(error):
        choose(cluster, request_)


async def test_concurrent_placements_never_oversubscribe_a_node(etcd):
    """Ten deciders at once on one node that has room for four: exactly four placed, each record naming it."""
    name = f"solo-{uuid.uuid4().hex[:6]}"
    records = Records(etcd)
    await records.put(NODES, node(name, vcpus=4, memory=4096).record, name)
    nodes = ClusterNodes(
        SimpleNamespace(etcd=etcd, directory=SimpleNamespace(instances=lambda kind: [SimpleNamespace(node=name)]))
    )
    store = SandboxStore(etcd)
    deciders = [SandboxPlacement(nodes) for _ in range(10)]

    async def place(decider):
        request = sandbox(tenant=f"race-{name}")
        try:
            await decider.place(request)
            return request.node
        except ResourceExhausted:
            return None

    placed = await asyncio.gather(*(place(d) for d in deciders))
    assert placed.count(name) == 4 and placed.count(None) == 6
    on_node = [r for r in await store.list(every_tenant=True) if r.node == name]
    assert sum(r.vcpus for r in on_node) == 4


async def test_one_gateways_burst_decides_each_placement_once(etcd):
    """Twelve creates at once through one gateway's placement: each is decided and recorded in one attempt (they
    take turns in the gateway instead of all reading one view and all but one losing the transaction)."""
    name = f"burst-{uuid.uuid4().hex[:6]}"
    await Records(etcd).put(NODES, node(name, vcpus=64, memory=65536).record, name)
    nodes = ClusterNodes(
        SimpleNamespace(etcd=etcd, directory=SimpleNamespace(instances=lambda kind: [SimpleNamespace(node=name)]))
    )
    store = SandboxStore(etcd)
    decider = SandboxPlacement(nodes)
    requests = [sandbox(tenant=f"burst-{name}") for _ in range(12)]
    await asyncio.gather(*(decider.place(request) for request in requests))
    assert {request.node for request in requests} == {name}
    assert len(decider.timings) == 12  # one decision each, no retries
    assert len([r for r in await store.list(every_tenant=True) if r.node == name]) == 12


class LateDirectory:
    """A directory whose one compute service registers only when `register` is called (a stack just starting)."""

    def __init__(self, node: str) -> None:
        self.node, self.registered = node, asyncio.Event()

    def instances(self, kind: str):
        return [SimpleNamespace(node=self.node)] if self.registered.is_set() else []

    async def wait_for(self, kind: str, timeout: float):
        await asyncio.wait_for(self.registered.wait(), timeout)
        return self.instances(kind)


async def test_a_create_before_any_compute_registers_waits_for_one(etcd):
    """A create that arrives while no compute service is registered yet (or all are restarting) is placed once
    one registers, instead of failing with NO_COMPUTE_NODES."""
    name = f"late-{uuid.uuid4().hex[:6]}"
    await Records(etcd).put(NODES, node(name).record, name)
    directory = LateDirectory(name)
    decider = SandboxPlacement(ClusterNodes(SimpleNamespace(etcd=etcd, directory=directory)))
    request = sandbox(tenant=f"late-{name}")
    asyncio.get_running_loop().call_later(0.3, directory.registered.set)
    await decider.place(request)
    assert request.node == name


async def test_a_create_with_no_compute_for_the_whole_wait_says_none_is_answering(etcd):
    decider = SandboxPlacement(ClusterNodes(SimpleNamespace(etcd=etcd, directory=LateDirectory("never"))))
    decider.compute_wait = 0.2
    with pytest.raises(Unavailable, match="no compute node is answering"):
        await decider.place(sandbox(tenant="nobody-answers"))


async def test_a_placement_is_one_read_and_one_transaction(etcd):
    """The tenant's quota and usage, the guards, the sandboxes and the nodes are read in one round trip, as of one
    revision; the record is then written with the guards compared, in another."""
    name = f"reads-{uuid.uuid4().hex[:6]}"
    await Records(etcd).put(NODES, node(name).record, name)
    counting = CountingEtcd(etcd)
    directory = SimpleNamespace(instances=lambda kind: [SimpleNamespace(node=name)])
    nodes = ClusterNodes(SimpleNamespace(etcd=counting, directory=directory))
    decider = SandboxPlacement(nodes)
    request = sandbox(tenant=f"reads-{name}")
    await decider.place(request)
    assert request.node == name and counting.requests == ["transaction", "transaction"]
