"""TemplateImages: how long a user template's build image lives, and what it costs its tenant.

A published image counts in its tenant's stored bytes (the `snapshot_bytes` quota, which the disk quota includes
too) from the moment it is published until it is dropped: reserved under `template-<image>` (builds of an
unchanged plan share one image and one reservation). Images of superseded builds are dropped by `prune`: a build
keeps its image while a tag names it, while a sandbox or snapshot came from it, or while it is one of the
template's newest `KEEP_NEWEST` successful builds (to go back to); the build record stays, without an image.
"""

from __future__ import annotations

import grpc
import structlog

from microvm.compute.v1 import compute_pb2
from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import template_pb2
from services.common import deadlines
from services.common.errors import ServiceError
from services.common.records import SANDBOXES, SNAPSHOTS, TEMPLATE_BUILDS, TEMPLATES
from services.gateway.nodes import ClusterNodes
from services.gateway.quotas import QuotaClient
from services.gateway.template_store import TemplateStore

log = structlog.get_logger()
KEEP_NEWEST = 3


def reservation(image: str) -> str:
    return f"template-{image}"


class TemplateImages:
    def __init__(self, store: TemplateStore, nodes: ClusterNodes, quotas: QuotaClient | None) -> None:
        self.store, self.nodes, self.quotas = store, nodes, quotas

    async def charge(self, tenant: str, image: str, size: int) -> None:
        """Holds `size` bytes of the tenant's stored-bytes quota for the image (RESOURCE_EXHAUSTED when over)."""
        if tenant and self.quotas is not None:
            amount = auth_types.QuotaAmount(snapshot_bytes=size)
            await self.quotas.reserve(tenant, reservation(image), amount)

    async def drop(self, node: str, image: str, tenant: str) -> None:
        """Removes the image from every node that has it (it was built on `node`; copies are elsewhere) and gives
        its bytes back (best effort: a node that is away keeps it until it is dropped again)."""
        holders = {node} | {v.record.name for v in (await self.nodes.views([])).values() if image in v.record.templates}
        request = compute_pb2.DeleteImageRequest(image=image)
        failed = False
        for holder in sorted(holders):
            try:
                await self.nodes.on_compute(holder, lambda c: c.DeleteImage(request, timeout=deadlines.CONTROL))
            except (ServiceError, grpc.aio.AioRpcError) as exc:
                log.warning("template_image_delete_failed", node=holder, image=image, error=str(exc))
                failed = failed or holder == node
        if failed:
            return
        if tenant and self.quotas is not None:
            await self.quotas.release(tenant, reservation(image))

    async def needed_builds(self) -> set[str]:
        """Builds some sandbox or snapshot came from."""
        records = self.store.records
        needed = {s.message.template_build for s in await records.list(SANDBOXES)}
        return needed | {s.message.template_build for s in await records.list(SNAPSHOTS)}

    async def drop_orphans(self, builds: list[template_pb2.TemplateBuildRecord], needed: set[str]) -> int:
        still = {b.image for b in builds if b.id in needed}
        dropped = 0
        for build in builds:
            if build.id in needed:
                continue
            if build.image not in still:
                await self.drop(build.node, build.image, build.tenant)
                still.add(build.image)  # once per image
                dropped += 1
            await self.store.records.delete(TEMPLATE_BUILDS, build.id)
        return dropped

    async def prune(self) -> int:
        """Drops the images of superseded builds; returns how many."""
        records = self.store.records
        templates = {(s.message.tenant, s.message.name): s.message for s in await records.list(TEMPLATES)}
        builds = [s.message for s in await records.list(TEMPLATE_BUILDS)]
        needed = await self.needed_builds()
        by_template: dict[tuple[str, str], list[template_pb2.TemplateBuildRecord]] = {}
        for build in builds:
            if build.state == template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED and build.image:
                by_template.setdefault((build.tenant, build.template), []).append(build)
        dropped = 0
        for owner, succeeded in by_template.items():
            template = templates.get(owner)
            if template is None:  # a deleted template's builds that forced users needed: gone once unused
                dropped += await self.drop_orphans(succeeded, needed)
                continue
            succeeded.sort(key=lambda b: b.create_time.ToNanoseconds(), reverse=True)
            tagged = set(template.tags.values())
            kept = {b.image for i, b in enumerate(succeeded) if i < KEEP_NEWEST or b.id in tagged or b.id in needed}
            for build in succeeded:
                if not build.image or build.image in kept:
                    continue  # dropped with an earlier build of the same image, or still wanted
                image = build.image
                await self.drop(build.node, image, build.tenant)
                for same in succeeded:  # every build of that image loses it
                    if same.image == image:
                        same.image = ""
                        await records.put(TEMPLATE_BUILDS, same, same.id)
                dropped += 1
        if dropped:
            log.info("template_images_pruned", count=dropped)
        return dropped
