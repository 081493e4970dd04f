"""A three-node cluster on this machine (tests/cluster.py): placement, routing, snapshots across nodes, node loss,
cordon and drain. The nodes run the fake VMM, so every path above the VMM is the real one, in seconds; the
guest-booting variant (tests/integration/test_cluster_guests.py) proves what only a real VM can (a process
that survives a migration)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.records import SNAPSHOTS, VMS, Records
from services.gateway.records import sandbox_key
from tests.cluster import Cluster
from tests.guests import Gateway

LABELS = {"n1": ["zone=a"], "n2": ["zone=b"], "n3": ["zone=c"]}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster.in_short_temporary_dir()
    try:
        cluster.start(compute={"vmm": "fake", "warm_pool_size": 1, "orphan_grace_seconds": 2}, node_labels=LABELS)
        cluster.gateway = Gateway(cluster.control.gateway_address, cluster.control.admin_key)
        cluster.admin = nodes_pb2_grpc.NodeServiceStub(cluster.gateway.channel)
        yield cluster
    finally:
        cluster.stop()


def node_of(cluster, sandbox) -> str:
    return cluster.gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox.node


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return predicate()


def on(zone: str) -> dict:
    return {"node_selector": {"zone": zone}}


def test_three_node_creates_spread_over_the_nodes(cluster):
    gateway = cluster.gateway
    sandboxes = [gateway.create(labels={"spread": "yes"}) for _ in range(6)]
    try:
        counts = Counter(s.node for s in sandboxes)
        assert set(counts) == {"n1", "n2", "n3"} and max(counts.values()) <= 3, counts
        nodes = {n.name: n for n in cluster.admin.ListNodes(nodes_pb2.ListNodesRequest(), timeout=10).nodes}
        assert {n.state for n in nodes.values()} == {nodes_pb2.NODE_STATE_READY}
        assert sum(n.sandbox_count for n in nodes.values()) >= 6
    finally:
        for sandbox in sandboxes:
            gateway.delete(sandbox.name)


def test_three_node_exec_interactive_exec_and_files_work_on_every_node(cluster):
    gateway = cluster.gateway
    for zone, node in (("a", "n1"), ("b", "n2"), ("c", "n3")):
        sandbox = gateway.create(**on(zone))
        try:
            assert sandbox.node == node
            result = gateway.exec(sandbox.name, ["sh", "-c", "echo out; echo err >&2; exit 4"])
            assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 4)
            gateway.write_file(sandbox.name, "/root/note.txt", node.encode() * 1000)
            assert gateway.read_file(sandbox.name, "/root/note.txt") == node.encode() * 1000

            def interactive(name: str = sandbox.name):
                yield api.ExecInteractiveRequest(
                    config=api.ExecInteractiveConfig(
                        sandbox=name, process=api.ProcessConfig(argv=["sh", "-c", "read x; echo got:$x"])
                    )
                )
                yield api.ExecInteractiveRequest(stdin=b"hello\n")
                yield api.ExecInteractiveRequest(close_stdin=api.CloseStdin())

            output = b"".join(r.event.stdout for r in gateway.stub.ExecInteractive(interactive(), timeout=30))
            assert output == b"got:hello\n"
        finally:
            gateway.delete(sandbox.name)


def cordoned(cluster, *names: str):
    """Only the other nodes take new sandboxes while inside the block."""

    class Block:
        def __enter__(self):
            for name in names:
                cluster.admin.CordonNode(nodes_pb2.CordonNodeRequest(name=f"nodes/{name}", reason="test"), timeout=10)

        def __exit__(self, *exc):
            for name in names:
                cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name=f"nodes/{name}"), timeout=10)

    return Block()


def test_three_node_snapshot_on_one_node_restores_and_forks_on_the_others(cluster):
    gateway = cluster.gateway
    with cordoned(cluster, "n2", "n3"):
        source = gateway.create()
    clones = []
    try:
        assert source.node == "n1"
        gateway.write_file(source.name, "/root/state.txt", b"from n1")
        snapshot = gateway.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=source.name), timeout=60).snapshot
        restored = gateway.stub.RestoreSnapshot(
            api.RestoreSnapshotRequest(snapshot=snapshot.name, sandbox=sandbox_pb2.Sandbox(**on("b"))), timeout=60
        ).sandbox
        clones.append(restored)
        assert restored.node == "n2"
        with cordoned(cluster, "n1"):
            forks = gateway.stub.ForkSandbox(api.ForkSandboxRequest(name=source.name, count=2), timeout=60).sandboxes
        clones += forks
        assert all(f.node in ("n2", "n3") for f in forks)
        for clone in clones:
            assert gateway.read_file(clone.name, "/root/state.txt") == b"from n1"
        holders = snapshot_holders(cluster, snapshot.name.split("/")[1])
        assert holders[0] == "n1" and "n2" in holders
    finally:
        for sandbox in [*clones, source]:
            gateway.delete(sandbox.name)


def test_three_node_a_template_is_copied_to_a_second_node_and_its_sandboxes_run_on_any(cluster):
    from microvm.sandbox.v1 import template_pb2 as tmpl
    from microvm.sandbox.v1 import template_service_pb2 as tapi
    from microvm.sandbox.v1 import template_service_pb2_grpc

    gateway = cluster.gateway
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)
    dockerfile = "FROM default\nWORKDIR /w\nRUN echo from-the-build > where.txt\n"

    def requests():
        yield tapi.BuildTemplateRequest(spec=tapi.BuildTemplateSpec(template="templates/copied", dockerfile=dockerfile))

    events = list(stub.BuildTemplate(requests(), timeout=120))
    build = [e.build for e in events if e.WhichOneof("event") == "build"][-1]
    assert build.state == tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED, build.failure_message
    template = stub.GetTemplate(tapi.GetTemplateRequest(name="templates/copied"), timeout=10).template
    assert len(template.nodes) == 2 and build.node in template.nodes  # built on one node, copied to another
    zone = {"n1": "a", "n2": "b", "n3": "c"}
    sandboxes = []
    third = ({"n1", "n2", "n3"} - set(template.nodes)).pop()
    try:
        # Both holders, then the node without it, which fetches the image first.
        for node in [*template.nodes, third]:
            sandbox = gateway.create(template="copied", **on(zone[node]))
            sandboxes.append(sandbox)
            assert sandbox.node == node
            result = gateway.exec(sandbox.name, ["sh", "-c", "cat where.txt"])
            assert (result.exit_code, result.stdout) == (0, b"from-the-build\n")
    finally:
        for sandbox in sandboxes:
            gateway.delete(sandbox.name)
    stub.DeleteTemplate(tapi.DeleteTemplateRequest(name="templates/copied"), timeout=30)


def vm_record(cluster, node: str, vm_id: str):
    import asyncio

    async def read():
        client = cluster.control.etcd_client()
        await client.connect()
        try:
            return (await Records(client).get(VMS, node, vm_id)).message
        finally:
            await client.close()

    return asyncio.run(read())


def snapshot_holders(cluster, snapshot_id: str) -> list[str]:
    import asyncio

    async def read():
        client = cluster.control.etcd_client()
        await client.connect()
        try:
            return list((await Records(client).get(SNAPSHOTS, snapshot_id)).message.holder_nodes)
        finally:
            await client.close()

    return asyncio.run(read())


def test_three_node_cordon_keeps_new_sandboxes_away(cluster):
    gateway = cluster.gateway
    cordoned = cluster.admin.CordonNode(
        nodes_pb2.CordonNodeRequest(name="nodes/n3", reason="maintenance"), timeout=10
    ).node
    assert cordoned.cordoned and cordoned.reason == "maintenance"
    sandboxes = []
    try:
        sandboxes = [gateway.create() for _ in range(4)]
        assert "n3" not in {s.node for s in sandboxes}
        with pytest.raises(grpc.RpcError) as failure:
            gateway.create(**on("c"))
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name="nodes/n3"), timeout=10)
        for sandbox in sandboxes:
            gateway.delete(sandbox.name)


def test_three_node_drain_with_migrate_moves_every_sandbox_keeping_its_id_and_files(cluster):
    gateway = cluster.gateway
    with cordoned(cluster, "n1", "n3"):
        sandboxes = [gateway.create(labels={"drain": "yes"}) for _ in range(3)]
    try:
        assert {s.node for s in sandboxes} == {"n2"}
        for sandbox in sandboxes:
            gateway.write_file(sandbox.name, "/root/keep.txt", sandbox.name.encode())
        drained = cluster.admin.DrainNode(nodes_pb2.DrainNodeRequest(name="nodes/n2", migrate=True), timeout=300)
        assert sorted(drained.migrated) == sorted(s.name for s in sandboxes)
        assert drained.node.cordoned and drained.node.sandbox_count == 0
        for sandbox in sandboxes:
            moved = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox
            assert moved.node in ("n1", "n3") and moved.state == sandbox_pb2.SANDBOX_STATE_RUNNING
            assert gateway.read_file(sandbox.name, "/root/keep.txt") == sandbox.name.encode()
            assert gateway.exec(sandbox.name, ["true"]).exit_code == 0
    finally:
        cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name="nodes/n2"), timeout=10)
        for sandbox in sandboxes:
            gateway.delete(sandbox.name)


def test_three_node_admin_calls_refuse_bad_input(cluster):
    with pytest.raises(grpc.RpcError) as failure:
        cluster.admin.GetNode(nodes_pb2.GetNodeRequest(name="nodes/nowhere"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    cluster.admin.CordonNode(nodes_pb2.CordonNodeRequest(name="nodes/n2"), timeout=10)
    cluster.admin.CordonNode(nodes_pb2.CordonNodeRequest(name="nodes/n3"), timeout=10)
    sandbox = cluster.gateway.create(**on("a"))
    try:
        with pytest.raises(grpc.RpcError) as failure:
            cluster.admin.DrainNode(nodes_pb2.DrainNodeRequest(name="nodes/n1", migrate=True), timeout=60)
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "last schedulable node" in failure.value.details()
    finally:
        for name in ("n1", "n2", "n3"):
            cluster.admin.UncordonNode(nodes_pb2.UncordonNodeRequest(name=f"nodes/{name}"), timeout=10)
        cluster.gateway.delete(sandbox.name)


def test_node_loss_makes_its_sandboxes_unavailable_and_they_return_with_the_node(cluster):
    gateway = cluster.gateway
    sandbox = gateway.create(**on("b"))
    gateway.write_file(sandbox.name, "/root/survivor.txt", b"still here")
    try:
        killed_at = time.monotonic()
        cluster.kill_node("n2")

        def unavailable():
            got = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox
            return got if got.state == sandbox_pb2.SANDBOX_STATE_UNAVAILABLE else None

        lost = wait_for(unavailable, timeout=10)
        assert lost and "n2" in lost.failure_message
        assert time.monotonic() - killed_at <= 2 + 2.0, "the sandbox outlived its node's 2 s lease as RUNNING"
        with pytest.raises(grpc.RpcError) as failure:
            gateway.exec(sandbox.name, ["true"])
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        elsewhere = [gateway.create() for _ in range(3)]
        assert "n2" not in {s.node for s in elsewhere}
        for other in elsewhere:
            gateway.delete(other.name)
        node = cluster.admin.GetNode(nodes_pb2.GetNodeRequest(name="nodes/n2"), timeout=10).node
        assert node.state == nodes_pb2.NODE_STATE_UNAVAILABLE

        cluster.start_node("n2")
        cluster.wait_for_node("n2")

        def running():
            got = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox
            return got.state == sandbox_pb2.SANDBOX_STATE_RUNNING

        assert wait_for(running, timeout=30)
        assert gateway.read_file(sandbox.name, "/root/survivor.txt") == b"still here"
    finally:
        gateway.delete(sandbox.name)


def test_node_loss_a_sandbox_deleted_while_its_node_is_away_is_gone_from_it_when_it_returns(cluster):
    gateway = cluster.gateway
    sandbox = gateway.create(**on("c"))
    vm_directory = Path(vm_record(cluster, "n3", sandbox_key("default", sandbox.name.split("/")[1])).directory)
    cluster.kill_node("n3")
    assert wait_for(
        lambda: not cluster.control.health() or "n3" not in {i.node for i in cluster.control.registered()}, timeout=10
    )
    gateway.delete(sandbox.name)  # the record and the quota go now; the node cannot be asked
    with pytest.raises(grpc.RpcError) as failure:
        gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert vm_directory.exists()  # its VM still runs on the lost node
    cluster.start_node("n3")
    cluster.wait_for_node("n3")
    assert wait_for(lambda: not vm_directory.exists(), timeout=30), "the returned node kept the deleted sandbox's VM"


def test_node_loss_a_second_node_with_a_live_id_refuses_to_start(cluster):
    import subprocess
    import sys

    from tests.stack import REPO

    node = cluster.nodes["n1"]
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node.namespace,
            sys.executable,
            "-m",
            "services.compute",
            "--config",
            str(node.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MVM_STATE_DIR": str(node.state_dir / "second")},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "already runs a compute service" in result.stderr and "Traceback" not in result.stderr


def test_three_node_mvm_lists_cordons_and_pins_to_nodes(cluster):
    import os
    import subprocess
    import sys

    def mvm(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mvm_cli.main", "--gateway", cluster.control.gateway_address, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, MVM_API_KEY=cluster.control.admin_key),
        )

    listed = mvm("nodes", "--no-headers")
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == ["n1", "n2", "n3"]
    assert "zone=b" in listed.stdout and "Ready" in listed.stdout
    cordon = mvm("nodes", "cordon", "n1", "--reason", "disk swap")
    assert cordon.returncode == 0 and "Cordoned" in cordon.stdout and "disk swap" in cordon.stdout
    assert mvm("nodes", "uncordon", "n1").returncode == 0
    missing = mvm("nodes", "get", "nowhere")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    created = mvm("create", "--node-selector", "zone=c")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    try:
        assert json.loads(mvm("get", sandbox_id, "--json").stdout)["node"] == "n3"
    finally:
        mvm("rm", sandbox_id)


def test_three_node_a_killed_gateway_and_auth_replica_leave_the_others_serving(cluster, tmp_path_factory):
    import os
    import signal

    from tests.stack import start_stack

    second = start_stack(
        tmp_path_factory.mktemp("control-2"),
        {"pki_dir": str(cluster.control.state_dir / "pki"), "auth": {"listen": f"{cluster.gateway_ip}:0"}},
        role="control",
        etcd_endpoint=cluster.control.etcd_endpoint,
    )
    try:
        other = Gateway(second.gateway_address, cluster.control.admin_key)  # keys and records are cluster-wide
        sandbox = cluster.gateway.create()
        registered = cluster.control.registered()
        # The first stack's replicas: its gateway (the address the fixture uses) and the older auth.
        first = {
            "gateway": next(
                i for i in registered if i.kind == "gateway" and i.address == cluster.control.gateway_address
            ),
            "auth": min((i for i in registered if i.kind == "auth"), key=lambda i: i.started),
        }
        for instance in first.values():
            os.kill(instance.pid, signal.SIGKILL)
        assert set(first) == {"gateway", "auth"}
        assert other.exec(sandbox.name, ["echo", "carried on"]).stdout == b"carried on\n"
        created = other.create()
        assert created.state == sandbox_pb2.SANDBOX_STATE_RUNNING
        other.delete(created.name)
        other.delete(sandbox.name)
    finally:
        second.stop()
        # The first replicas were restarted by their supervisor; later tests use the first gateway.
        assert wait_for(lambda: cluster.control.health().get("gateway") == "SERVING", timeout=30)


def test_three_node_mvm_supervisor_makes_the_first_admin_key_where_it_does_not_run_auth(cluster, tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.stack import REPO

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"etcd_endpoints": [cluster.control.etcd_endpoint], "pki_dir": str(cluster.control.state_dir / "pki")}
        )
    )
    command = [
        sys.executable,
        "-m",
        "services.supervisor.main",
        "admin-key",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    made = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "state" / "admin.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    admin = nodes_pb2_grpc.NodeServiceStub(
        Gateway(cluster.control.gateway_address, key_file.read_text().strip()).channel
    )
    assert len(admin.ListNodes(nodes_pb2.ListNodesRequest(), timeout=10).nodes) == 3
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.returncode == 1 and "exists already" in again.stderr
