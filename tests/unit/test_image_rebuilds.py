"""An image built again under the same recipe hash is another filesystem: nothing frozen or written over the first
build is ever run over the second (its guest would read every cached block as corrupt). Fake VMM, real etcd."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from images.rootfs import filesystem_id
from microvm.compute.v1 import compute_pb2
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1 import snapshot_pb2 as snapshot_types
from microvm.types.v1 import vm_pb2
from services.common.errors import error_info
from services.common.records import VMS, Records
from tests.unit.test_compute_node import start_node, until

pytestmark = pytest.mark.timeout(120)


def mkfs(path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path), "4M"], check=True)


def test_a_filesystem_id_tells_builds_apart_and_survives_copies(tmp_path):
    first, second = tmp_path / "first.ext4", tmp_path / "second.ext4"
    mkfs(first)
    mkfs(second)
    assert len(filesystem_id(first)) == 32 and filesystem_id(first) != filesystem_id(second)
    copy = tmp_path / "copy.ext4"
    copy.write_bytes(first.read_bytes())
    assert filesystem_id(copy) == filesystem_id(first)
    (tmp_path / "zeros").write_bytes(bytes(8192))
    assert filesystem_id(tmp_path / "zeros") == ""
    assert filesystem_id(tmp_path) == "" and filesystem_id(tmp_path / "missing") == ""


def build_rootfs(image_dir: Path) -> str:
    """A new build's root filesystem in the fake image: sparse, with an ext4 superblock of a new UUID."""
    fs_uuid = uuid.uuid4().bytes
    superblock = bytearray(0x78)
    superblock[0x38:0x3A] = (0xEF53).to_bytes(2, "little")
    superblock[0x68:0x78] = fs_uuid
    work = image_dir / ".rootfs.new"
    with open(work, "wb") as f:
        f.truncate(1 << 30)
        f.seek(1024)
        f.write(superblock)
    work.replace(image_dir / "rootfs.ext4")  # as a rebuild replaces the whole build directory: a new file
    return fs_uuid.hex()


def failure_reason(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    return info.reason if info else ""


async def test_nothing_taken_on_a_build_runs_over_the_next_build_of_the_same_recipe(tmp_path, etcd_server, etcd):
    image_dir = tmp_path / "images" / "default" / "fakebuild0001"
    image_dir.mkdir(parents=True)
    first = build_rootfs(image_dir)
    node = await start_node(tmp_path, etcd_server, etcd, warm_pool_size=0)
    try:
        configs = node.node.state_dir / "compute" / "templates" / "default"

        async def frozen_over(rootfs_id: str):
            for path in configs.glob("*/config.json"):
                if (path.parent / ".complete").exists() and json.loads(path.read_text())["rootfs_id"] == rootfs_id:
                    return path

        await until(lambda: frozen_over(first))
        vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="on-first"), timeout=30)).vm
        assert vm.start_method == "template-snapshot" and vm.rootfs_id == first
        await node.write("on-first", "/root/kept", b"1")
        await node.compute.SnapshotVm(
            compute_pb2.SnapshotVmRequest(vm_id="on-first", snapshot_id="snap-first"), timeout=60
        )
        store = snapshot_pb2_grpc.SnapshotStoreServiceStub(node.node.channel(await node.node.address("snapshot")))
        record = snapshot_types.SnapshotRecord(id="snap-first", source_sandbox="on-first", template="default", vcpus=1)
        await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=10)
        await node.compute.StopVm(compute_pb2.StopVmRequest(vm_id="on-first"), timeout=30)

        second = build_rootfs(image_dir)
        # The template snapshot of the first build is not restored over the second: a cold boot meanwhile, then
        # upkeep freezes the second build and creates restore from that.
        vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="on-second"), timeout=30)).vm
        assert vm.start_method == "cold-boot" and vm.rootfs_id == second
        await until(lambda: frozen_over(second))
        vm = (await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="restored"), timeout=30)).vm
        assert vm.start_method == "template-snapshot"

        # A user's snapshot of the first build offered that build with it: restored over a copy of the first build
        # fetched back from the store, never over the second.
        clone = (
            await node.compute.RestoreVm(
                compute_pb2.RestoreVmRequest(vm_id="clone", snapshot_id="snap-first"), timeout=60
            )
        ).vm
        assert clone.rootfs_id == first and await node.read("clone", "/root/kept") == b"1"
        stored = (await Records(etcd).get(VMS, node.node.node, "clone")).message
        assert Path(stored.image_dir) == node.node.state_dir / "compute" / "builds" / first
        # A stopped VM's disk of the first build, and a snapshot kept on the node (never offered) of the second once
        # a third is built: refused with the reason, kept as they are.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.compute.StartVm(compute_pb2.StartVmRequest(vm_id="on-first"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failure_reason(refused.value) == "IMAGE_REBUILT"
        assert (await node.vm("on-first")).state == vm_pb2.VM_STATE_STOPPED
        kept = compute_pb2.SnapshotVmRequest(vm_id="restored", snapshot_id="kept-second", local_only=True)
        await node.compute.SnapshotVm(kept, timeout=60)
        third = build_rootfs(image_dir)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.compute.RestoreVm(
                compute_pb2.RestoreVmRequest(vm_id="clone-2", snapshot_id="kept-second", local_snapshot=True),
                timeout=60,
            )
        assert failure_reason(refused.value) == "IMAGE_REBUILT" and second in refused.value.details()
        assert third != second
    finally:
        await node.node.stop_all()
