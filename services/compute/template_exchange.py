"""TemplateExchange: template snapshots shared between nodes the way user snapshots are.

A node that froze a template snapshot also stores it in its snapshot store under a name derived from what makes
it usable elsewhere (template, image build, size, VMM, accelerator, NIC), as a record of no tenant. A node that
needs that template snapshot and has none fetches it (its store gets the chunks from a holder, verified) instead
of booting the template cold. Records of older image builds are deleted when a newer one is published.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from collections.abc import Callable

import grpc
import structlog

from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from services.common import deadlines
from services.common.errors import ServiceError
from services.compute.artifacts import ARTIFACT_FILES, upload
from services.compute.templates import TemplateSnapshots

log = structlog.get_logger()
PREFIX = "tmpl-"
SOURCE = "template:"


class TemplateExchange:
    def __init__(self, templates: TemplateSnapshots, store: Callable[[], snapshot_pb2_grpc.SnapshotStoreServiceStub]):
        self.templates, self.store = templates, store
        self.lifecycle = templates.lifecycle

    def build(self, template: str) -> str:
        """This node's image build of the template: its recipe hash and its root filesystem's id (two nodes build
        the same recipe into different filesystems, and a template snapshot restores only over its own)."""
        image = self.lifecycle.images.load(template)
        return f"{image.directory.name}-{image.rootfs_id[:12]}" if image.rootfs_id else image.directory.name

    def snapshot_id(self, template: str, vcpus: int, memory_mib: int) -> str | None:
        try:
            build = self.build(template)
        except FileNotFoundError:
            return None
        driver = self.lifecycle.driver
        boot = hashlib.sha256(driver.boot_args.encode()).hexdigest()[:8]
        name = f"{template}-{build}-{vcpus}c{memory_mib}m-{driver.name}-{driver.accel}-{driver.machine}-{boot}"
        name += "-net" if self.lifecycle.network is not None else ""
        name = re.sub(r"[^a-z0-9-]", "-", name.lower())
        if len(PREFIX + name) > 63:
            name = hashlib.sha256(name.encode()).hexdigest()[:40]
        return PREFIX + name

    async def fetch(self, template: str, vcpus: int, memory_mib: int) -> bool:
        """Installs the template snapshot of that size from another node; False when none is published."""
        snapshot_id = self.snapshot_id(template, vcpus, memory_mib)
        if snapshot_id is None:
            return False
        store = self.store()
        try:
            record = (
                await store.GetSnapshotRecord(
                    snapshot_pb2.GetSnapshotRecordRequest(id=snapshot_id), timeout=deadlines.QUICK
                )
            ).record
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        materialized = await self.templates.snapshots.materialize(record, store)
        work = self.templates.directory(template, vcpus, memory_mib)
        work = work.with_name(f".{work.name}.fetched")
        shutil.rmtree(work, ignore_errors=True)
        work.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(materialized.rename, work)  # the node's copy becomes the template snapshot
        (work / "verified.json").unlink(missing_ok=True)
        build = self.lifecycle.images.load(template).directory.name
        self.templates.install(work, template, vcpus, memory_mib, build)
        if self.templates.frozen(template, vcpus, memory_mib) is None:
            return False  # unusable here (frozen() said why and dropped it): built here instead, not fetched again
        log.info(
            "template_snapshot_fetched",
            template=template,
            vcpus=vcpus,
            memory_mib=memory_mib,
            holders=list(record.holder_nodes),
        )
        return True

    async def publish(self, template: str, vcpus: int, memory_mib: int) -> None:
        """Offers this node's template snapshot of that size to the others (best effort: they can build it)."""
        snapshot_id = self.snapshot_id(template, vcpus, memory_mib)
        directory = self.templates.directory(template, vcpus, memory_mib)
        if snapshot_id is None or directory is None:
            return
        store = self.store()
        try:
            for name, filename in ARTIFACT_FILES.items():
                if (directory / filename).exists():
                    await upload(store, snapshot_id, name, directory / filename)
            build = self.build(template)
            record = SnapshotRecord(
                id=snapshot_id,
                tenant="",
                source_sandbox=f"{SOURCE}{template}",
                template=template,
                vcpus=vcpus,
                memory_mib=memory_mib,
                labels={"template-snapshot": "true", "build": build},
            )
            await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=deadlines.CONTROL)
            await self._forget_older(template, build, store)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("template_snapshot_not_published", template=template, error=str(exc))

    async def _forget_older(self, template: str, build: str, store) -> None:
        """Records of this template's older image builds are of no use to any node any more."""
        listed = await store.ListSnapshotRecords(
            snapshot_pb2.ListSnapshotRecordsRequest(source_sandbox=f"{SOURCE}{template}"), timeout=deadlines.QUICK
        )
        for record in listed.records:
            if record.labels.get("build") != build:
                await store.DeleteSnapshotRecord(
                    snapshot_pb2.DeleteSnapshotRecordRequest(id=record.id), timeout=deadlines.QUICK
                )
