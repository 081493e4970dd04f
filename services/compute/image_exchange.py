"""ImageExchange: a user template's image on more than one node, through the snapshot stores.

The node that publishes an image also stores it in its snapshot store as a record of no tenant (`img-<image>`):
its root filesystem (compacted: a qcow2 of the raw image, or the fake VMM's tree as a tar) and its manifest. Any
other node can then fetch it (its store gets the chunks from a holder, verified) and install it beside its own
images: the gateway has a second node fetch each new image at once, so the template survives the loss of the node
that built it, and a node asked for an image it lacks fetches it first. Kernel and initramfs are the fetching
node's own default image's (one serves every template).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from google.protobuf import json_format

from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1 import template_pb2
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from services.common import deadlines
from services.common.errors import NotFound
from services.compute.artifacts import ARTIFACT_FILES, upload
from services.compute.disks import pack_tree, run_tool, unpack_tree
from services.compute.images import is_user_image
from services.compute.lifecycle import VmLifecycle
from services.compute.snapshots import VmSnapshots

log = structlog.get_logger()
PREFIX = "img-"
SOURCE = "image:"


class ImageExchange:
    def __init__(
        self,
        lifecycle: VmLifecycle,
        snapshots: VmSnapshots,
        store: Callable[[], snapshot_pb2_grpc.SnapshotStoreServiceStub],
    ) -> None:
        self.lifecycle, self.snapshots, self.store = lifecycle, snapshots, store
        self.tree = getattr(lifecycle.driver, "disk_format", "qcow2") == "tree"
        self._fetching: dict[str, asyncio.Lock] = {}

    @staticmethod
    def record_id(image: str) -> str:
        return PREFIX + image

    async def publish(self, image: str) -> None:
        """Offers the image to the other nodes through this node's snapshot store."""
        built = self.lifecycle.images.load(image)
        work = self.lifecycle.root.parent / f".publish-{image}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            if self.tree:
                name = "disk-tree"
                await asyncio.to_thread(pack_tree, built.rootfs, work / ARTIFACT_FILES[name])
            else:
                name = "disk"
                target = str(work / ARTIFACT_FILES[name])
                await run_tool(
                    "qemu-img", "convert", "-U", "-O", "qcow2", str(built.rootfs), target, reason="IMAGE_COPY_FAILED"
                )
            (work / ARTIFACT_FILES["config"]).write_text(json.dumps(built.manifest))
            store, record_id = self.store(), self.record_id(image)
            for artifact in (name, "config"):
                await upload(store, record_id, artifact, work / ARTIFACT_FILES[artifact])
            record = SnapshotRecord(
                id=record_id, tenant="", source_sandbox=f"{SOURCE}{image}", template=image, labels={"image": "true"}
            )
            await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=deadlines.CONTROL)
            log.info("image_offered", image=image)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def ensure(self, image: str) -> None:
        """The image on this node: fetched from the one that offered it when missing (NOT_FOUND when none did)."""
        if not is_user_image(image) or image in self.lifecycle.images.names():
            return
        async with self._fetching.setdefault(image, asyncio.Lock()):
            if image in self.lifecycle.images.names():
                return
            store = self.store()
            try:
                request = snapshot_pb2.GetSnapshotRecordRequest(id=self.record_id(image))
                record = (await store.GetSnapshotRecord(request, timeout=deadlines.QUICK)).record
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(f"image {image!r} is on no node that offers it", reason="IMAGE_NOT_FOUND") from None
                raise
            materialized = await self.snapshots.materialize(record, store)
            try:
                await self.install(image, materialized)
            finally:
                shutil.rmtree(materialized, ignore_errors=True)  # the installed image is the copy kept
            log.info("image_fetched", image=image, holders=list(record.holder_nodes))

    async def install(self, image: str, files: Path) -> None:
        manifest = json.loads((files / ARTIFACT_FILES["config"]).read_text())
        config = template_pb2.ImageConfig(pool_size=-1)
        json_format.ParseDict(manifest.get("config") or {}, config)
        images = self.lifecycle.images
        work = await asyncio.to_thread(images.stage, image, images.load("default"), config)
        manifest_path = work / "manifest.json"
        staged = json.loads(manifest_path.read_text())
        staged["rootfs_size_mib"] = manifest.get("rootfs_size_mib", staged["rootfs_size_mib"])
        manifest_path.write_text(json.dumps(staged, indent=1))
        rootfs = work / "rootfs.ext4"
        if self.tree:
            await asyncio.to_thread(unpack_tree, files / ARTIFACT_FILES["disk-tree"], rootfs)
        else:
            source = str(files / ARTIFACT_FILES["disk"])
            await run_tool("qemu-img", "convert", "-O", "raw", source, str(rootfs), reason="IMAGE_COPY_FAILED")
        await asyncio.to_thread(images.complete, image, work)

    async def forget(self, image: str) -> None:
        """The offer goes with the image (best effort: a record nobody fetches again costs only its chunks)."""
        try:
            request = snapshot_pb2.DeleteSnapshotRecordRequest(id=self.record_id(image))
            await self.store().DeleteSnapshotRecord(request, timeout=deadlines.QUICK)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("image_offer_not_deleted", image=image, error=exc.details())
