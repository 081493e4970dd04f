"""A snapshot restores on a node whose own build of the image is another filesystem: the exact build travels with
it (services/compute/build_exchange.py), and a frozen disk reaches it through its link (disks.py BASE_LINK)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from images.builder import BuiltImage
from microvm.compute.v1 import compute_pb2
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1 import snapshot_pb2 as snapshot_types
from services.common.errors import error_info
from services.common.records import VMS, Records
from services.compute.build_exchange import BuildExchange, portable
from services.compute.disks import BASE_LINK, backing_name, create_overlay, freeze, point_base_link
from services.compute.templates import file_facts
from tests.unit.test_compute_node import start_node
from tests.unit.test_image_rebuilds import build_rootfs

pytestmark = pytest.mark.timeout(120)


def qemu_io(disk: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(disk)], check=True, capture_output=True)


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(a), str(b)]).returncode == 0


async def test_a_frozen_disk_reaches_its_base_through_the_link_wherever_it_is_copied(tmp_path):
    base = tmp_path / "node-a" / "rootfs.ext4"
    base.parent.mkdir()
    with open(base, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"the build's own block".ljust(4096, b"."))
    disk = tmp_path / "vm.qcow2"
    await create_overlay(base, "raw", disk)
    qemu_io(disk, "write -P 0x42 2M 64k")
    frozen = tmp_path / "snapshot"
    frozen.mkdir()
    await freeze(disk, base, frozen / "disk.qcow2", link_base=True)
    assert backing_name(frozen / "disk.qcow2") == BASE_LINK and portable(frozen)
    assert identical(disk, frozen / "disk.qcow2")

    # On another node: the snapshot's files, and that node's copy of the build elsewhere.
    copy = tmp_path / "node-b" / "snapshot"
    copy.mkdir(parents=True)
    os.link(frozen / "disk.qcow2", copy / "disk.qcow2")
    build_copy = tmp_path / "node-b" / "builds" / "rootfs.ext4"
    build_copy.parent.mkdir()
    build_copy.write_bytes(base.read_bytes())
    base.unlink()  # node A's path means nothing on node B
    point_base_link(copy, build_copy)
    clone = tmp_path / "clone.qcow2"
    await create_overlay(copy / "disk.qcow2", "qcow2", clone)
    os.link(build_copy, base)  # only to compare with the original chain
    assert identical(disk, clone)

    # The link is what it reads: pointed at another filesystem, the clone reads that one.
    other = tmp_path / "node-b" / "other.ext4"
    with open(other, "wb") as f:
        f.truncate(8 << 20)
    point_base_link(copy, other)
    assert not identical(disk, clone)
    assert backing_name(base) is None and backing_name(tmp_path / "missing") is None


async def test_a_snapshot_restores_on_a_node_with_another_build_of_its_image(tmp_path, etcd_server, etcd):
    builds = {}
    nodes = {}
    for name in ("a", "b"):
        image_dir = tmp_path / name / "images" / "default" / "fakebuild0001"
        image_dir.mkdir(parents=True)
        builds[name] = build_rootfs(image_dir)  # the same recipe built on each node: two filesystems
    try:
        for name in ("a", "b"):
            nodes[name] = await start_node(tmp_path / name, etcd_server, etcd, warm_pool_size=0)
        a, b = nodes["a"], nodes["b"]
        vm = (await a.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="source"), timeout=30)).vm
        assert vm.rootfs_id == builds["a"]
        await a.write("source", "/root/kept", b"from a")
        await a.compute.SnapshotVm(compute_pb2.SnapshotVmRequest(vm_id="source", snapshot_id="snap-a"), timeout=60)
        store = snapshot_pb2_grpc.SnapshotStoreServiceStub(a.node.channel(await a.node.address("snapshot")))
        record = snapshot_types.SnapshotRecord(id="snap-a", source_sandbox="source", template="default", vcpus=1)
        await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=10)
        offered = await store.GetSnapshotRecord(
            snapshot_pb2.GetSnapshotRecordRequest(id=f"build-{builds['a']}"), timeout=10
        )
        assert offered.record.tenant == "" and list(offered.record.holder_nodes) == [a.node.node]
        # Two nodes of one host here: node A's image path must mean nothing to node B, as on two hosts.
        (tmp_path / "a" / "images").rename(tmp_path / "a" / "elsewhere")

        restored = (
            await b.compute.RestoreVm(compute_pb2.RestoreVmRequest(vm_id="moved", snapshot_id="snap-a"), timeout=60)
        ).vm
        assert restored.rootfs_id == builds["a"]
        assert await b.read("moved", "/root/kept") == b"from a"
        fetched = b.node.state_dir / "compute" / "builds" / builds["a"]
        assert Path((await Records(etcd).get(VMS, b.node.node, "moved")).message.directory).exists()
        assert Path((await Records(etcd).get(VMS, b.node.node, "moved")).message.image_dir) == fetched
        fetched_at = (fetched / "rootfs.ext4").stat().st_mtime_ns

        # Fetched once: a second restore uses the copy; the node's own sandboxes keep its own build.
        again = compute_pb2.RestoreVmRequest(vm_id="moved-2", snapshot_id="snap-a")
        assert (await b.compute.RestoreVm(again, timeout=60)).vm.rootfs_id == builds["a"]
        assert (fetched / "rootfs.ext4").stat().st_mtime_ns == fetched_at
        own = (await b.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="own"), timeout=30)).vm
        assert own.rootfs_id == builds["b"]

        # A build nobody offers (its record gone) cannot be had: refused with the reason, nothing started over B's.
        await store.DeleteSnapshotRecord(
            snapshot_pb2.DeleteSnapshotRecordRequest(id=f"build-{builds['a']}"), timeout=10
        )
        shutil.rmtree(fetched)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await b.compute.RestoreVm(compute_pb2.RestoreVmRequest(vm_id="moved-3", snapshot_id="snap-a"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused.value).reason == "IMAGE_REBUILT" and "no node offered" in refused.value.details()
    finally:
        for node in nodes.values():
            await node.node.stop_all()


def test_a_template_snapshot_checks_its_own_files_not_the_image_its_link_names(tmp_path):
    """Its files are hashed once and checked on every use: following the link to the image read a whole root
    filesystem each time (a cold create beside a pool refill took 1.2-1.8x the raw boot instead of 1.0x)."""
    image = tmp_path / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / "devices.bin").write_bytes(b"state")
    (frozen / "ram").write_bytes(b"pages")
    point_base_link(frozen, image)
    facts = file_facts(frozen)
    assert sorted(facts) == ["devices.bin", "ram"]
    assert facts["ram"] == {"size": 5, "sha256": ""} and len(facts["devices.bin"]["sha256"]) == 64


def test_fetched_builds_go_once_no_vm_sits_on_them_and_none_was_used_lately(tmp_path):
    exchange = BuildExchange(materialize=None, root=tmp_path / "builds")
    ids = {}
    for name in ("in-use", "used-lately", "idle"):
        directory = tmp_path / "builds" / name
        directory.mkdir(parents=True)
        ids[name] = build_rootfs(directory)
        (directory / "manifest.json").write_text('{"template": "default"}')
        (directory / ".complete").touch()
        directory.rename(tmp_path / "builds" / ids[name])
    hour_ago = time.time() - 3600
    for name in ("in-use", "idle"):
        os.utime(tmp_path / "builds" / ids[name], (hour_ago, hour_ago))
    assert exchange.local(ids["used-lately"]) is not None  # a restore found it just now
    dropped = exchange.prune({tmp_path / "builds" / ids["in-use"]}, min_age_seconds=600)
    assert dropped == [ids["idle"]]
    assert exchange.local(ids["in-use"]) and exchange.local(ids["used-lately"]) and not exchange.local(ids["idle"])


async def test_a_user_templates_image_is_not_offered_again_as_a_build(tmp_path):
    """It travels between nodes as an image already (image_exchange.py), with the same filesystem."""
    directory = tmp_path / "u-app" / "build"
    directory.mkdir(parents=True)
    build_rootfs(directory)
    (directory / "manifest.json").write_text('{"template": "u-app"}')
    (directory / ".complete").touch()
    image = BuiltImage.at(directory)
    assert image.rootfs_id
    await BuildExchange(materialize=None, root=tmp_path / "builds").offer(image, store=None)  # no store is asked
