"""Compute on one node, against the fake VMM: the real relay, snapshot store and compute services in this event
loop, real etcd. Lifecycle, warm starts, capacity, failures and re-adoption, in seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path

import grpc
import pytest

from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from microvm.types.v1 import vm_pb2
from services.common.records import NODES, VMS, Records
from tests.inprocess import InProcessNode, fake_image_root

pytestmark = pytest.mark.timeout(120)


async def until(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


class NodeUnderTest:
    def __init__(self, node: InProcessNode) -> None:
        self.node = node

    async def connect(self) -> None:
        self.compute = compute_pb2_grpc.ComputeServiceStub(self.node.channel(await self.node.address("compute")))
        relay = self.node.channel(await self.node.address("relay"))
        self.data = sandbox_service_pb2_grpc.SandboxServiceStub(relay)
        self.control = relay_pb2_grpc.GuestControlServiceStub(relay)

    async def exec(self, vm_id: str, argv: list[str]) -> tuple[bytes, int]:
        stdout = b""
        async for event in self.data.Exec(
            api.ExecRequest(sandbox=f"sandboxes/{vm_id}", process=api.ProcessConfig(argv=argv)), timeout=30
        ):
            stdout += event.stdout
            if event.HasField("exited"):
                return stdout, event.exited.exit_code
        raise AssertionError("no exit")

    async def write(self, vm_id: str, path: str, data: bytes) -> None:
        async def requests():
            yield api.WriteFileRequest(
                header=api.WriteFileHeader(sandbox=f"sandboxes/{vm_id}", path=path, make_parents=True)
            )
            yield api.WriteFileRequest(data=data)

        await self.data.WriteFile(requests(), timeout=30)

    async def read(self, vm_id: str, path: str) -> bytes:
        return b"".join(
            [
                c.data
                async for c in self.data.ReadFile(
                    api.ReadFileRequest(sandbox=f"sandboxes/{vm_id}", path=path), timeout=30
                )
            ]
        )

    async def hostname(self, vm_id: str) -> str:
        reply = await self.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id=vm_id, timeout_ms=5000))
        return reply.hostname

    async def vm(self, vm_id: str) -> vm_pb2.VmRecord:
        return (await self.compute.GetVm(compute_pb2.GetVmRequest(vm_id=vm_id), timeout=10)).vm

    async def pool_ready(self) -> bool:
        vms = await Records(self.etcd).list(VMS, self.node.node)
        return any(s.message.pooled and s.message.state == vm_pb2.VM_STATE_PAUSED for s in vms)


async def start_node(tmp_path, etcd_server, etcd, **compute) -> NodeUnderTest:
    # A short state dir: agent sockets live under it, and a unix socket path has at most 107 bytes.
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvmn-")))
    images = fake_image_root(tmp_path / "images")
    node.settings["compute"] = {
        "vmm": "fake",
        "image_cache_dir": str(images),
        "ram_dir": str(tmp_path / "ram"),
        "warm_pool_size": 1,
        "vcpus_total": 4,
        "memory_mib_total": 2048,
        **compute,
    }
    for kind in ("snapshot", "relay", "compute"):
        await node.start(kind)
    under_test = NodeUnderTest(node)
    under_test.etcd = etcd
    await under_test.connect()
    return under_test


@pytest.fixture
async def node(tmp_path, etcd_server, etcd):
    under_test = await start_node(tmp_path, etcd_server, etcd)
    yield under_test
    await under_test.node.stop_all()


async def test_cold_create_exec_files_and_delete(node):
    vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="cold-1", memory_mib=320), timeout=30)).vm
    assert (vm.state, vm.start_method, vm.vmm) == (vm_pb2.VM_STATE_RUNNING, "cold-boot", "fake")
    assert not vm.directory and not vm.agent.socket_path, "a node's paths stay on the node"
    directory = (await Records(node.etcd).get(VMS, node.node.node, "cold-1")).message.directory
    assert os.path.isdir(directory)
    assert await node.exec("cold-1", ["sh", "-c", "echo hi; exit 3"]) == (b"hi\n", 3)
    await node.write("cold-1", "/root/a.txt", b"data")
    assert await node.read("cold-1", "/root/a.txt") == b"data"
    await node.compute.DeleteVm(compute_pb2.DeleteVmRequest(vm_id="cold-1"), timeout=30)
    assert not os.path.exists(directory)
    assert await Records(node.etcd).get(VMS, node.node.node, "cold-1") is None
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await node.exec("cold-1", ["true"])
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_pooled_vm_is_handed_out_with_its_own_identity(node):
    await until(node.pool_ready)
    vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="warm-1"), timeout=30)).vm
    assert vm.start_method == "warm-pool" and vm.state == vm_pb2.VM_STATE_RUNNING
    assert await node.hostname("warm-1") == "warm-1"
    assert (await node.exec("warm-1", ["hostname"]))[0].strip() in (b"warm-1", os.uname().nodename.encode())
    vms = {s.message.id for s in await Records(node.etcd).list(VMS, node.node.node)}
    assert "warm-1" in vms and not any(v == vm.boot_hostname for v in vms)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a claimed VM its priority back needs root")
async def test_a_pool_vm_fills_at_low_cpu_priority_and_is_claimed_at_normal_priority(node):
    """Refilling the pool after a burst must not take the CPU from the sandboxes just handed out."""
    await until(node.pool_ready)
    pooled = next(s.message for s in await Records(node.etcd).list(VMS, node.node.node) if s.message.pooled)
    assert os.getpriority(os.PRIO_PROCESS, pooled.pid) == 10  # compute.pool_fill_niceness
    vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="warm-nice"), timeout=30)).vm
    assert vm.start_method == "warm-pool"
    claimed = (await Records(node.etcd).get(VMS, node.node.node, "warm-nice")).message
    assert claimed.pid == pooled.pid
    threads = os.listdir(f"/proc/{claimed.pid}/task")
    assert [os.getpriority(os.PRIO_PROCESS, int(t)) for t in threads] == [0] * len(threads)
    assert await node.exec("warm-nice", ["true"]) == (b"", 0)


async def test_capacity_is_enforced_and_freed(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="big-1", vcpus=3, memory_mib=1024), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="big-2", vcpus=3, memory_mib=1024), timeout=30)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await node.compute.DeleteVm(compute_pb2.DeleteVmRequest(vm_id="big-1"), timeout=30)
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="big-2", vcpus=3, memory_mib=1024), timeout=30)


async def test_bad_requests_get_clear_statuses(node):
    cases = [
        (dict(vm_id="Bad Id"), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(vm_id="ok-1", vcpus=99), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(vm_id="ok-1", template="nope"), grpc.StatusCode.NOT_FOUND),
    ]
    for fields, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await node.compute.CreateVm(compute_pb2.CreateVmRequest(**fields), timeout=30)
        assert failure.value.code() == code, fields


async def test_a_killed_vmm_marks_the_vm_failed_with_its_reason(node):
    vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="doomed", memory_mib=320), timeout=30)).vm
    os.kill(vm.pid, signal.SIGKILL)

    async def failed():
        got = await node.vm("doomed")
        return got if got.state == vm_pb2.VM_STATE_FAILED else None

    got = await until(failed)
    assert "exited unexpectedly" in got.failure_message and got.pid == 0


async def test_snapshot_and_restore_keep_files_and_give_a_new_identity(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="src-1", memory_mib=320), timeout=30)
    await node.write("src-1", "/root/state.txt", b"kept")
    await node.compute.SnapshotVm(compute_pb2.SnapshotVmRequest(vm_id="src-1", snapshot_id="snap-unit-1"), timeout=60)
    # Commit the record as the gateway does, then restore.
    from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
    from microvm.types.v1 import snapshot_pb2 as snapshot_types

    store = snapshot_pb2_grpc.SnapshotStoreServiceStub(node.node.channel(await node.node.address("snapshot")))
    await store.CommitSnapshot(
        snapshot_pb2.CommitSnapshotRequest(
            record=snapshot_types.SnapshotRecord(
                id="snap-unit-1", source_sandbox="src-1", template="default", vcpus=1, memory_mib=320
            )
        ),
        timeout=10,
    )
    clone = (
        await node.compute.RestoreVm(
            compute_pb2.RestoreVmRequest(vm_id="clone-1", snapshot_id="snap-unit-1"), timeout=60
        )
    ).vm
    assert clone.start_method == "snapshot-restore" and clone.source_snapshot == "snap-unit-1"
    assert await node.read("clone-1", "/root/state.txt") == b"kept"
    assert await node.hostname("clone-1") == "clone-1"
    await node.write("clone-1", "/root/state.txt", b"changed")
    assert await node.read("src-1", "/root/state.txt") == b"kept"


async def test_a_snapshot_kept_on_the_node_restores_there_without_a_record(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="src-here", memory_mib=320), timeout=30)
    await node.write("src-here", "/root/state.txt", b"kept here")
    freeze = compute_pb2.SnapshotVmRequest(vm_id="src-here", snapshot_id="snap-here-1", local_only=True)
    assert (await node.compute.SnapshotVm(freeze, timeout=60)).size_bytes > 0
    restore = compute_pb2.RestoreVmRequest(vm_id="clone-here", snapshot_id="snap-here-1", local_snapshot=True)
    clone = (await node.compute.RestoreVm(restore, timeout=60)).vm
    assert clone.source_snapshot == "snap-here-1" and await node.read("clone-here", "/root/state.txt") == b"kept here"
    # It never reached the store: by record it does not exist; and a copy this node lacks is not here.
    for request in (
        compute_pb2.RestoreVmRequest(vm_id="clone-x", snapshot_id="snap-here-1"),
        compute_pb2.RestoreVmRequest(vm_id="clone-y", snapshot_id="snap-elsewhere", local_snapshot=True),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await node.compute.RestoreVm(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pause_resume_and_stop_start_keep_the_disk(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="ps-1", memory_mib=320), timeout=30)
    await node.write("ps-1", "/root/f", b"1")
    paused = (await node.compute.PauseVm(compute_pb2.PauseVmRequest(vm_id="ps-1"), timeout=10)).vm
    assert paused.state == vm_pb2.VM_STATE_PAUSED
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await node.exec("ps-1", ["true"])
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await node.compute.ResumeVm(compute_pb2.ResumeVmRequest(vm_id="ps-1"), timeout=10)
    stopped = (await node.compute.StopVm(compute_pb2.StopVmRequest(vm_id="ps-1"), timeout=30)).vm
    assert stopped.state == vm_pb2.VM_STATE_STOPPED and stopped.pid == 0
    started = (await node.compute.StartVm(compute_pb2.StartVmRequest(vm_id="ps-1"), timeout=30)).vm
    assert started.state == vm_pb2.VM_STATE_RUNNING
    assert await node.read("ps-1", "/root/f") == b"1"


async def test_a_restarted_compute_adopts_running_vms_and_reports_its_node(node):
    vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="keep-1", memory_mib=320), timeout=30)).vm
    await node.node.stop("compute")
    await node.node.start("compute")
    await node.connect()
    adopted = await node.vm("keep-1")
    assert adopted.state == vm_pb2.VM_STATE_RUNNING and adopted.pid == vm.pid
    assert (await node.exec("keep-1", ["echo", "still"]))[0] == b"still\n"
    record = (await Records(node.etcd).get(NODES, node.node.node)).message
    assert record.vmm == "fake" and "default" in record.templates and record.capacity.vcpus == 4


async def test_a_second_compute_for_the_same_node_refuses_to_start(node):
    from services.common.registry import NodeTaken

    with pytest.raises(NodeTaken, match="already runs a compute service"):
        await node.node.start_duplicate("compute")


async def test_a_node_fetches_the_template_snapshot_another_node_published(tmp_path, etcd_server, etcd):
    from services.common.records import SNAPSHOTS

    first = await start_node(tmp_path / "first", etcd_server, etcd, warm_pool_size=0)
    second = None
    try:

        async def published():
            for stored in await Records(etcd).list(SNAPSHOTS):
                record = stored.message
                if record.source_sandbox == "template:default" and first.node.node in record.holder_nodes:
                    return record

        record = await until(published)
        second = await start_node(tmp_path / "second", etcd_server, etcd, warm_pool_size=1)

        async def fetched():
            current = (await Records(etcd).get(SNAPSHOTS, record.id)).message
            return second.node.node in current.holder_nodes

        await until(fetched)
        await until(second.pool_ready)
        vm = (await second.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="from-shared"), timeout=30)).vm
        assert vm.start_method == "warm-pool"
    finally:
        for node in (first, second):
            if node is not None:
                await node.node.stop_all()


async def test_a_vm_whose_sandbox_no_longer_names_its_node_is_deleted_after_the_grace(tmp_path, etcd_server, etcd):
    from microvm.types.v1 import sandbox_pb2 as sandbox_types
    from services.common.records import SANDBOXES

    node = await start_node(tmp_path, etcd_server, etcd, warm_pool_size=0, orphan_grace_seconds=1)
    try:
        name = node.node.node
        # Sandbox records first, as placement writes them: one names this node, the other another one.
        await Records(etcd).put(SANDBOXES, sandbox_types.SandboxRecord(id="kept-vm", node=name), "kept-vm")
        await Records(etcd).put(SANDBOXES, sandbox_types.SandboxRecord(id="moved-vm", node=name), "moved-vm")
        for vm_id in ("kept-vm", "moved-vm"):
            await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id=vm_id, memory_mib=320), timeout=30)
        await Records(etcd).put(SANDBOXES, sandbox_types.SandboxRecord(id="moved-vm", node="elsewhere"), "moved-vm")

        async def reaped():
            return await Records(etcd).get(VMS, name, "moved-vm") is None

        await until(reaped, timeout=10)
        assert (await node.vm("kept-vm")).state == vm_pb2.VM_STATE_RUNNING
    finally:
        await node.node.stop_all()


@pytest.mark.parametrize(("field", "older"), [("machine", "fake-0"), ("boot_args", "norandmaps")])
async def test_a_template_snapshot_of_another_vm_machine_is_rebuilt_not_restored(
    tmp_path, etcd_server, etcd, field, older
):
    """After an upgrade that changed the VM's devices (QEMU's PIT went) or its kernel arguments (compute.guest_aslr),
    a template snapshot taken before is not used: a create boots cold instead, and upkeep freezes a new one."""
    import json

    node = await start_node(tmp_path, etcd_server, etcd, warm_pool_size=0)
    try:
        configs = node.node.state_dir / "compute" / "templates" / "default"

        async def frozen_config():
            found = [p for p in configs.glob("*/config.json") if (p.parent / ".complete").exists()]
            return found[0] if found else None

        config_path = await until(frozen_config)
        config = json.loads(config_path.read_text())
        current = config[field]
        assert (config["machine"], config["boot_args"]) == ("fake-1", "")
        # A new file, as an older compute wrote it (the node's snapshot store may share the old one's inode).
        (config_path.parent / "config.new").write_text(json.dumps({**config, field: older}))
        (config_path.parent / "config.new").replace(config_path)
        vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="after-upgrade"), timeout=30)).vm
        assert vm.start_method == "cold-boot"

        async def rebuilt():
            path = await frozen_config()
            return path is not None and json.loads(path.read_text())[field] == current

        await until(rebuilt)
        again = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="restored"), timeout=30)).vm
        assert again.start_method == "template-snapshot"
    finally:
        await node.node.stop_all()
