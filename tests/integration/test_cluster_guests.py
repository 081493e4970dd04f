"""The cluster with real guests (QEMU) where only a real VM can prove it: a drain with migrate moves a sandbox to
another node with its memory, so a process that was counting keeps counting from where it was."""

from __future__ import annotations

import pytest

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.cluster import Cluster
from tests.guests import Gateway
from tests.integration.test_cluster import wait_for
from tests.integration.test_snapshots import COUNTER

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster.in_short_temporary_dir()
    try:
        # Cold boots only: no template snapshots or pools to build on three nodes of a 2-core machine.
        cluster.start(
            compute={"vmm": "qemu", "warm_pool_size": 0, "template_snapshots": False},
        )
        cluster.gateway = Gateway(cluster.control.gateway_address, cluster.control.admin_key)
        cluster.admin = nodes_pb2_grpc.NodeServiceStub(cluster.gateway.channel)
        yield cluster
    finally:
        cluster.stop()


def count(gateway, sandbox) -> int:
    return int(gateway.exec(sandbox.name, ["cat", "/tmp/count"]).stdout or 0)


def test_three_node_drain_with_migrate_keeps_a_file_and_a_counting_process(cluster):
    gateway = cluster.gateway
    # Unpinned, so it may move; created while only n1 is schedulable.
    for other in ("n2", "n3"):
        cluster.admin.CordonNode(nodes_pb2.CordonNodeRequest(name=f"nodes/{other}"), timeout=10)
    sandbox = gateway.create(labels={"migrate": "me"})
    for other in ("n2", "n3"):
        cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name=f"nodes/{other}"), timeout=10)
    try:
        assert sandbox.node == "n1"
        gateway.write_file(sandbox.name, "/root/note.txt", b"written on n1")
        gateway.exec(sandbox.name, ["sh", "-c", COUNTER])
        assert wait_for(lambda: count(gateway, sandbox) >= 10, timeout=60)
        before = count(gateway, sandbox)
        drained = cluster.admin.DrainNode(nodes_pb2.DrainNodeRequest(name="nodes/n1", migrate=True), timeout=600)
        assert drained.migrated == [sandbox.name] and drained.node.sandbox_count == 0
        moved = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox
        assert moved.node in ("n2", "n3") and moved.state == sandbox_pb2.SANDBOX_STATE_RUNNING
        assert gateway.read_file(sandbox.name, "/root/note.txt") == b"written on n1"
        after = count(gateway, sandbox)
        # Memory came along: the count goes on from where it was, not from zero, and keeps going.
        assert after >= before
        assert wait_for(lambda: count(gateway, sandbox) > after, timeout=30)
        assert gateway.exec(sandbox.name, ["hostname"]).stdout.decode().strip() == sandbox.name.split("/")[1]
    finally:
        cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name="nodes/n1"), timeout=10)
        gateway.delete(sandbox.name)
