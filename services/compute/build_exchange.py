"""BuildExchange: the exact image build a snapshot sits on, on whichever node restores it.

Every node builds the built-in images itself, and two builds of one recipe are two filesystems (images/rootfs.py
`filesystem_id`): a guest frozen over one build and restored over another would read its cached blocks as corrupt.
So a snapshot that leaves its node takes its build along: the first snapshot uploaded over a build offers that
build in the node's snapshot store (record `build-<filesystem id>`, of no tenant: root filesystem, kernel,
initramfs, manifest), and a node asked to restore a snapshot whose build it lacks fetches it (its store gets the
chunks from a holder, verified) into `<state>/compute/builds/<filesystem id>`. A frozen disk names its base through
a link beside it (disks.py `BASE_LINK`), which each node points at its own copy of that build.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from images.builder import BuiltImage
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from services.common import deadlines
from services.common.errors import DataLoss
from services.compute.artifacts import upload
from services.compute.disks import BASE_LINK, backing_name
from services.compute.images import is_user_image

log = structlog.get_logger()
PREFIX = "build-"
# Artifact name -> file of a BuiltImage directory (services/compute/artifacts.py ARTIFACT_FILES names them too).
BUILD_FILES = {
    "rootfs": "rootfs.ext4",
    "kernel": "vmlinux",
    "bzimage": "bzImage",
    "initramfs": "initramfs.cpio.gz",
    "manifest": "manifest.json",
}
Store = snapshot_pb2_grpc.SnapshotStoreServiceStub


class BuildExchange:
    def __init__(self, materialize: Callable, root: Path) -> None:
        # VmSnapshots.materialize: a record's artifacts on this node, fetched and verified.
        self.materialize = materialize
        self.root = root
        self._offered: set[str] = set()  # by this compute since it started (the store keeps them for good)
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def record_id(rootfs_id: str) -> str:
        return PREFIX + rootfs_id

    def local(self, rootfs_id: str) -> BuiltImage | None:
        """This node's fetched copy of the build whose root filesystem is `rootfs_id`, if it has one (its use is
        noted: `prune` keeps what was used lately)."""
        try:
            image = BuiltImage.at(self.root / rootfs_id)
            os.utime(image.directory)
        except (OSError, ValueError, KeyError):
            return None
        return image if image.rootfs_id == rootfs_id else None

    def prune(self, in_use: set[Path], min_age_seconds: float) -> list[str]:
        """Drops the fetched builds no VM of this node sits on (`in_use`: their image directories) and none used for
        `min_age_seconds`; a later restore fetches one again. Returns what went."""
        dropped = []
        for directory in sorted(self.root.iterdir()) if self.root.exists() else []:
            try:
                idle = time.time() - directory.stat().st_mtime
            except FileNotFoundError:
                continue
            fetching = self._locks.get(directory.name)
            if directory in in_use or idle < min_age_seconds or (fetching is not None and fetching.locked()):
                continue
            shutil.rmtree(directory, ignore_errors=True)
            dropped.append(directory.name)
        if dropped:
            log.info("image_builds_pruned", rootfs_ids=dropped)
        return dropped

    async def offer(self, image: BuiltImage, store: Store) -> None:
        """`image`'s build in this node's store, unless it is there already (from this node or another)."""
        rootfs_id = image.rootfs_id
        if not rootfs_id or rootfs_id in self._offered or is_user_image(image.name):  # those travel as images
            return
        async with self._locks.setdefault(rootfs_id, asyncio.Lock()):
            if rootfs_id in self._offered:
                return
            if await self._record(rootfs_id, store) is None:
                record_id = self.record_id(rootfs_id)
                for name, filename in BUILD_FILES.items():
                    if (image.directory / filename).is_file():
                        await upload(store, record_id, name, image.directory / filename)
                record = SnapshotRecord(
                    id=record_id,
                    tenant="",
                    source_sandbox=f"build:{image.name}",
                    template=image.name,
                    labels={"image-build": image.directory.name},
                )
                await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=deadlines.CONTROL)
                log.info("image_build_offered", template=image.name, build=image.directory.name, rootfs_id=rootfs_id)
            self._offered.add(rootfs_id)

    async def fetch(self, rootfs_id: str, store: Store) -> BuiltImage | None:
        """The build whose root filesystem is `rootfs_id` on this node: its copy, or fetched from the node that
        offered it; None when no node did."""
        if image := self.local(rootfs_id):
            return image
        async with self._locks.setdefault(rootfs_id, asyncio.Lock()):
            if image := self.local(rootfs_id):
                return image
            record = await self._record(rootfs_id, store)
            if record is None:
                return None
            fetched = await self.materialize(record, store)  # hashes checked against the record's
            (fetched / ".complete").touch()
            target = self.root / rootfs_id
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            await asyncio.to_thread(fetched.rename, target)
            image = self.local(rootfs_id)
            if image is None:  # its files are what was offered, and that was another filesystem: refused
                shutil.rmtree(target, ignore_errors=True)
                raise DataLoss(
                    f"image build {self.record_id(rootfs_id)} holds another root filesystem", reason="BUILD_MISMATCH"
                )
            log.info(
                "image_build_fetched",
                template=image.name,
                rootfs_id=rootfs_id,
                holders=list(record.holder_nodes),
            )
            return image

    async def _record(self, rootfs_id: str, store: Store) -> SnapshotRecord | None:
        request = snapshot_pb2.GetSnapshotRecordRequest(id=self.record_id(rootfs_id))
        try:
            return (await store.GetSnapshotRecord(request, timeout=deadlines.QUICK)).record
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def portable(frozen: Path) -> bool:
    """Whether the disk frozen in `frozen` reaches its base only through its link (disks.py BASE_LINK), or not at
    all (the fake VMM's tree), so that any copy of the exact build can serve it. Older snapshots name their base
    by its absolute path: only the build at that path can."""
    disk = frozen / "disk.qcow2"
    if disk.exists():
        return backing_name(disk) == BASE_LINK
    return (frozen / "disk.tar").exists()
