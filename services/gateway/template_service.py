"""TemplateService: the public template API (protos/microvm/sandbox/v1/template_service.proto). Thin: the
records are TemplateStore's, builds TemplateBuilds', and this module says who may do what to which template.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import structlog

from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.sandbox.v1 import template_service_pb2_grpc
from services.common import deadlines
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, ServiceError
from services.common.records import SANDBOXES, SNAPSHOTS, TEMPLATE_BUILDS, TEMPLATES
from services.common.validation import check_page_size
from services.gateway.access import current_principal
from services.gateway.build_intake import intake, receive
from services.gateway.build_watch import follow_record, with_keepalives
from services.gateway.nodes import ClusterNodes
from services.gateway.template_builds import TemplateBuilds
from services.gateway.template_store import (
    RUNNING_BUILDS,
    TemplateStore,
    build_view,
    owner_key,
    parse_build_name,
    parse_reference,
    template_view,
)
from services.gateway.template_tags import TemplateTags

log = structlog.get_logger()


def page(items: list, page_size: int, token: str) -> tuple[list, str]:
    size = check_page_size(page_size)
    try:
        offset = int(token or 0)
    except ValueError:
        offset = -1
    if offset < 0:
        raise InvalidArgument("page_token is not one this server issued", reason="INVALID_PAGE_TOKEN")
    return items[offset : offset + size], str(offset + size) if offset + size < len(items) else ""


class TemplateOps:
    def __init__(self, store: TemplateStore, builds: TemplateBuilds, nodes: ClusterNodes, work_root: Path) -> None:
        self.store, self.builds, self.nodes, self.work_root = store, builds, nodes, work_root
        self.tags = TemplateTags(store)

    def creator(self) -> str:
        principal = current_principal()
        return principal.id if principal is not None else ""

    async def images(self) -> dict:
        """Build id -> what the nodes report of its image (where it is, whether warm, its size)."""
        reported = {t.name.removeprefix("templates/"): t for t in await self.store.catalog.images()}
        builds = await self.store.records.list(TEMPLATE_BUILDS)
        return {s.message.id: reported[s.message.image] for s in builds if s.message.image in reported}

    async def create(self, request: api.CreateTemplateRequest):
        record = await self.store.create(request.template, self.creator())
        return api.CreateTemplateResponse(template=template_view(record))

    async def get(self, name: str):
        template, tag = parse_reference(name)
        if ":" in name.removeprefix("templates/"):
            raise InvalidArgument("GetTemplate takes a name without a tag", reason="INVALID_TEMPLATE_NAME")
        stored = await self.store.find(template)
        if stored is None:
            for builtin in await self.store.catalog.all():
                if builtin.name == f"templates/{template}":
                    return api.GetTemplateResponse(template=builtin)
            await self.store.require(template)
        return api.GetTemplateResponse(template=template_view(stored.message, await self.images()))

    async def update(self, request: api.UpdateTemplateRequest):
        name, _ = parse_reference(request.template.name, "template.name")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask names no field", reason="UPDATE_MASK_EMPTY")
        for path in paths:
            if path not in ("description", "pool_size", "poolSize"):
                raise InvalidArgument(
                    f"update_mask path {path!r} cannot be changed (description, pool_size)", reason="FIELD_IMMUTABLE"
                )
        for _ in range(10):
            stored = await self.store.require_own(name)
            record = stored.message
            if "description" in paths:
                if len(request.template.description) > 1024:
                    raise InvalidArgument("description is longer than 1024 characters", reason="DESCRIPTION_TOO_LONG")
                record.description = request.template.description
            if "pool_size" in paths or "poolSize" in paths:
                wanted = request.template.pool_size if request.template.HasField("pool_size") else -1
                if not -1 <= wanted <= 64:
                    raise InvalidArgument("pool_size must be between 0 and 64", reason="POOL_SIZE_OUT_OF_RANGE")
                record.pool_size = wanted
            record.update_time.GetCurrentTime()
            if await self.store.save(stored):
                if "pool_size" in paths or "poolSize" in paths:
                    await self.resize_pools(record)
                return api.UpdateTemplateResponse(template=template_view(record, await self.images()))
        raise Aborted("the template kept changing; try again", reason="TEMPLATE_BUSY")

    async def resize_pools(self, record) -> None:
        """Applies a new pool size to the images its tags name, on every node that has them (best effort: a node
        that is away keeps the old size until the next build)."""
        builds = {b.id: b for b in await self.store.builds_of(record)}
        images = {builds[b].image for b in record.tags.values() if b in builds and builds[b].image}
        views = (await self.nodes.views([])).values()
        for image in sorted(images):
            request = compute_pb2.SetImagePoolSizeRequest(image=image, pool_size=record.pool_size)
            for view in views:
                if view.alive and image in view.record.templates:
                    try:
                        await self.nodes.on_compute(
                            view.record.name,
                            lambda c, r=request: c.SetImagePoolSize(r, timeout=deadlines.CONTROL),
                        )
                    except (ServiceError, grpc.aio.AioRpcError) as exc:
                        log.warning("template_pool_not_resized", node=view.record.name, image=image, error=str(exc))

    async def delete(self, request: api.DeleteTemplateRequest):
        name, _ = parse_reference(request.name)
        stored = await self.store.require_own(name)
        record = stored.message
        builds = await self.store.builds_of(record)
        running = [b.id for b in builds if b.state in RUNNING_BUILDS]
        if running:
            raise FailedPrecondition(
                f"template {name!r} has a build running ({running[0]}); wait for it", reason="BUILD_RUNNING"
            )
        ids = {b.id for b in builds}
        users = [
            s.message.name or s.message.id
            for s in await self.store.records.list(SANDBOXES)
            if s.message.template_build in ids
        ]
        users += [
            f"snapshots/{s.message.id}"
            for s in await self.store.records.list(SNAPSHOTS)
            if s.message.template_build in ids
        ]
        if users and not request.force:
            raise FailedPrecondition(
                f"template {name!r} is used by {len(users)} sandboxes or snapshots ({', '.join(users[:5])}); "
                "delete them first or pass force",
                reason="TEMPLATE_IN_USE",
                metadata={"template": name},
            )
        owner = owner_key(record.tenant)
        records = self.store.records
        # A build a forced user still needs keeps its record (and image) until the image sweep finds it unused.
        needed = await self.builds.images.needed_builds()
        deleted = await records.transaction(
            [records.unchanged(TEMPLATES, stored.revision, owner, name)],
            [records.delete_op(TEMPLATES, owner, name)]
            + [records.delete_op(TEMPLATE_BUILDS, b) for b in ids if b not in needed],
        )
        if not deleted:
            raise Aborted("the template changed while being deleted; try again", reason="TEMPLATE_BUSY")
        # Images no sandbox or snapshot needs go now (builds of an unchanged plan share one).
        kept = {b.image for b in builds if b.id in needed}
        for node, image in sorted({(b.node, b.image) for b in builds if b.image and b.image not in kept}):
            await self.builds.images.drop(node, image, record.tenant)
        return api.DeleteTemplateResponse()

    async def list_builds(self, request: api.ListTemplateBuildsRequest):
        name, _ = parse_reference(request.parent, "parent")
        builds = await self.store.builds_of((await self.store.require(name)).message)
        shown, token = page(builds, request.page_size, request.page_token)
        return api.ListTemplateBuildsResponse(builds=[build_view(b) for b in shown], next_page_token=token)

    async def build_log(self, name: str):
        return api.GetTemplateBuildLogResponse(data=(await self.store.build(name)).log_tail)

    async def build(self, requests):
        spec, context = await receive(requests, self.work_root, self.builds.settings.template_context_max_bytes)
        try:
            request = await intake(spec, context, self.store, self.builds.trust, self.builds.import_archive)
        except BaseException:
            if context is not None:
                shutil.rmtree(context.parent, ignore_errors=True)
            raise
        try:
            build, feed = await self.builds.start(request, self.creator())
        except BaseException:
            request.discard()
            raise
        async for event in with_keepalives(feed.follow(), api.BuildTemplateResponse):
            yield event

    async def watch(self, name: str):
        template, build_id = parse_build_name(name)
        await self.store.build(name)  # visible to the caller, or NOT_FOUND
        feed = self.builds.feeds.get(build_id)
        if feed is not None:
            live = (api.WatchTemplateBuildResponse.FromString(e.SerializeToString()) async for e in feed.follow())
        else:
            live = follow_record(lambda: self.store.build(name), api.WatchTemplateBuildResponse)
        async for event in with_keepalives(live, api.WatchTemplateBuildResponse):
            yield event

    async def list_all(self, request: sandbox_api.ListTemplatesRequest) -> sandbox_api.ListTemplatesResponse:
        """SandboxService.ListTemplates: built-in images, then the caller's and the public templates, by name."""
        images = await self.images()
        templates = await self.store.catalog.all()
        templates += [template_view(record, images) for record in await self.store.visible()]
        templates.sort(key=lambda t: t.name)
        shown, token = page(templates, request.page_size, request.page_token)
        return sandbox_api.ListTemplatesResponse(templates=shown, next_page_token=token)


class TemplateServicer(template_service_pb2_grpc.TemplateServiceServicer):
    def __init__(self, ops: TemplateOps) -> None:
        self.ops = ops

    async def CreateTemplate(self, request, context):
        return await self.ops.create(request)

    async def GetTemplate(self, request, context):
        return await self.ops.get(request.name)

    async def UpdateTemplate(self, request, context):
        return await self.ops.update(request)

    async def DeleteTemplate(self, request, context):
        return await self.ops.delete(request)

    async def BuildTemplate(self, request_iterator, context):
        async for event in self.ops.build(request_iterator):
            yield event

    async def WatchTemplateBuild(self, request, context):
        async for event in self.ops.watch(request.name):
            yield event

    async def GetTemplateBuild(self, request, context):
        return api.GetTemplateBuildResponse(build=build_view(await self.ops.store.build(request.name)))

    async def ListTemplateBuilds(self, request, context):
        return await self.ops.list_builds(request)

    async def GetTemplateBuildLog(self, request, context):
        return await self.ops.build_log(request.name)

    async def AssignTemplateTags(self, request, context):
        return await self.ops.tags.assign(request)

    async def RemoveTemplateTags(self, request, context):
        return await self.ops.tags.remove(request)
