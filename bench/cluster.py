"""`make bench` (cluster part): what the node-as-unit layout costs and buys, measured on a cluster on this machine
(tests/cluster.py: three nodes in network namespaces of their own, one beside the gateway; fake VMM, so the
figures are the control and data planes' own, not a guest's).

- parallel_creates_3_nodes: 20 CreateSandbox at once until all 20 answered an Exec, with three nodes
  schedulable, vs the same with one node schedulable (the other two cordoned), same run.
- placement_decision_p50 / _p99: one placement (view of nodes and sandboxes, choice, the etcd transaction that
  records it), timed in this process against the cluster's etcd, vs an etcd read of one key.
- exec_remote_node_p50: Exec(`true`) through the gateway on a sandbox of a node in another namespace, vs the
  same on a sandbox of the node in the gateway's own namespace (goal: within 1 ms).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from bench.run import emit, percentile
from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.records import SANDBOXES, Records
from services.gateway.nodes import ClusterNodes
from services.gateway.placement import SandboxPlacement
from tests.cluster import Cluster
from tests.guests import Gateway

PARALLEL = 20


def parallel_creates(gateway: Gateway) -> float:
    """Seconds until PARALLEL sandboxes created at once all answered an exec; they are deleted after."""

    def one(_):
        sandbox = gateway.create()
        gateway.exec(sandbox.name, ["true"])
        return sandbox

    started = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL) as pool:
        sandboxes = list(pool.map(one, range(PARALLEL)))
    elapsed = time.perf_counter() - started
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: gateway.delete(s.name), sandboxes))
    return elapsed


def exec_p50(gateway: Gateway, name: str, rounds: int = 60) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        gateway.exec(name, ["true"])
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[5:])


async def placement_timings(control, rounds: int = 200) -> tuple[list[float], list[float]]:
    client = control.etcd_client()
    await client.connect()
    try:
        nodes = ClusterNodes(
            SimpleNamespace(
                etcd=client,
                directory=SimpleNamespace(
                    instances=lambda kind: [SimpleNamespace(node=n) for n in ("n1", "n2", "n3", "local")]
                ),
            )
        )
        placement = SandboxPlacement(nodes)
        records = Records(client)
        reads = []
        for _ in range(rounds):
            record = sandbox_types.SandboxRecord(
                id=f"bench-{uuid.uuid4().hex[:10]}",
                tenant="bench",
                template="default",
                vcpus=1,
                memory_mib=128,
                state=sandbox_types.SANDBOX_RECORD_STATE_CREATING,
            )
            await placement.place(record)
            started = time.perf_counter()
            await records.get(SANDBOXES, record.id)
            reads.append(time.perf_counter() - started)
            await records.delete(SANDBOXES, record.id)
        return placement.timings, reads
    finally:
        await client.close()


def main() -> None:
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mvm-bench-cluster-")))
    try:
        cluster.start(
            compute={"vmm": "fake", "warm_pool_size": 2},
            local_nodes=("local",),
            node_labels={"local": ["where=local"], "n1": ["where=remote"]},
        )
        gateway = Gateway(cluster.control.gateway_address, cluster.control.admin_key)
        admin = nodes_pb2_grpc.NodeServiceStub(gateway.channel)
        time.sleep(5)  # warm pools filled
        admin.CordonNode(nodes_pb2.CordonNodeRequest(name="nodes/local"), timeout=10)
        three = parallel_creates(gateway)
        for name in ("n2", "n3"):
            admin.CordonNode(nodes_pb2.CordonNodeRequest(name=f"nodes/{name}"), timeout=10)
        time.sleep(3)  # n1's pool refilled
        one = parallel_creates(gateway)
        for name in ("n2", "n3", "local"):
            admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name=f"nodes/{name}"), timeout=10)
        emit(
            "parallel_creates_3_nodes",
            three,
            "s",
            one,
            f"{PARALLEL} creates with one node schedulable",
            "all answering exec within 2 s",
        )

        decisions, reads = asyncio.run(placement_timings(cluster.control))
        emit(
            "placement_decision_p50",
            statistics.median(decisions) * 1000,
            "ms",
            statistics.median(reads) * 1000,
            "etcd read of one key",
        )
        emit(
            "placement_decision_p99",
            percentile(decisions, 0.99) * 1000,
            "ms",
            percentile(reads, 0.99) * 1000,
            "etcd read of one key (p99)",
        )

        remote = gateway.create(node_selector={"where": "remote"})
        local = gateway.create(node_selector={"where": "local"})
        emit(
            "exec_remote_node_p50",
            exec_p50(gateway, remote.name) * 1000,
            "ms",
            exec_p50(gateway, local.name) * 1000,
            "the same on the node beside the gateway",
            "within 1 ms",
        )
        gateway.delete(remote.name)
        gateway.delete(local.name)
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
