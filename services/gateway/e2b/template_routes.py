"""What the E2B control plane answers about templates, each route a call of our TemplateService or SandboxService
with the caller's credential (so the tenant wall and the built-in templates' refusals are theirs):

- `GET /templates/aliases/{alias}` (`Template.exists`): GetTemplate;
- `GET /templates`: ListTemplates (the built-ins, the caller's and the public templates), each with its builds;
- `DELETE /templates/{templateID}`: DeleteTemplate (refused while sandboxes use it, as ours is without `force`),
  or DeleteSnapshot for one of our snapshot ids (snapshot_routes.py);
- `POST /templates/tags` (`assign_tags`): the build `target` (`name:tag`) names, from GetTemplate, then
  AssignTemplateTags; `DELETE /templates/tags` (`remove_tags`): RemoveTemplateTags;
- `GET /templates/{templateID}/tags` (`get_template_tags`): GetTemplate's tags and when each moved.

E2B's well-known names are aliases of our built-ins (shapes.TEMPLATE_ALIASES). E2B's build ids are UUIDs (the SDK
parses them as such): ours (`b` + 12 hex digits) travel as `00000000-0000-0000-0000-<those digits>`.
"""

from __future__ import annotations

import datetime

from aiohttp import web
from google.protobuf import timestamp_pb2

from microvm.sandbox.v1 import sandbox_service_pb2, template_pb2, template_service_pb2, template_service_pb2_grpc
from services.common import deadlines
from services.gateway.e2b import shapes
from services.gateway.e2b.shapes import E2bError
from services.gateway.e2b.snapshot_routes import is_snapshot

NO_BUILD = "00000000-0000-0000-0000-000000000000"  # a built-in template: no build of ours
BUILD_STATUS = {  # our build state -> E2B's buildStatus
    template_pb2.TEMPLATE_BUILD_STATE_QUEUED: "waiting",
    template_pb2.TEMPLATE_BUILD_STATE_BUILDING: "building",
    template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED: "ready",
    template_pb2.TEMPLATE_BUILD_STATE_FAILED: "error",
}


def build_uuid(build_id: str) -> str:
    return f"00000000-0000-0000-0000-{build_id.removeprefix('b')}" if build_id else NO_BUILD


def iso(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(datetime.UTC).isoformat().replace("+00:00", "Z")


def add(plane, app: web.Application) -> None:
    routes = TemplateRoutes(plane)
    for verb, path, handler in (
        ("GET", "/templates/aliases/{alias}", routes.alias),
        ("GET", "/templates", routes.list),
        ("POST", "/templates/tags", routes.assign_tags),
        ("DELETE", "/templates/tags", routes.remove_tags),
        ("GET", "/templates/{template}/tags", routes.tags),
        ("DELETE", "/templates/{template}", routes.delete),
    ):
        app.router.add_route(verb, path, handler)


class TemplateRoutes:
    def __init__(self, plane) -> None:
        self.plane = plane

    @property
    def stub(self) -> template_service_pb2_grpc.TemplateServiceStub:
        return template_service_pb2_grpc.TemplateServiceStub(self.plane.loopback.channel)  # open once serving

    async def _template(self, name: str, metadata) -> template_pb2.Template:
        request = template_service_pb2.GetTemplateRequest(name=f"templates/{name}")
        return (await self.stub.GetTemplate(request, metadata=metadata, timeout=deadlines.PUBLIC_CALL)).template

    async def _builds(self, name: str, metadata) -> list[template_pb2.TemplateBuild]:
        """The template's builds, newest first."""
        builds, token = [], ""
        while True:
            request = template_service_pb2.ListTemplateBuildsRequest(
                parent=f"templates/{name}", page_size=1000, page_token=token
            )
            reply = await self.stub.ListTemplateBuilds(request, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
            builds += reply.builds
            if not (token := reply.next_page_token):
                return builds

    async def alias(self, request: web.Request) -> web.Response:
        name = shapes.our_template(request.match_info["alias"])
        await self._template(name, self.plane.metadata(request))
        return web.json_response({"templateID": name, "public": False})

    async def list(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        sandboxes = self.plane.stub()
        templates, token = [], ""
        while True:
            page = sandbox_service_pb2.ListTemplatesRequest(page_size=1000, page_token=token)
            reply = await sandboxes.ListTemplates(page, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
            templates += reply.templates
            if not (token := reply.next_page_token):
                break
        return web.json_response([await self._listed(t, metadata) for t in templates])

    async def _listed(self, template: template_pb2.Template, metadata) -> dict:
        """E2B's `Template`. cpuCount and memoryMB are 0: a template of ours leaves its size to the installation
        (or its recipe), which this answer does not know."""
        name = template.name.removeprefix("templates/")
        names = [name] + [e2b for e2b, ours in shapes.TEMPLATE_ALIASES.items() if ours == name]
        builds = [] if template.builtin else await self._builds(name, metadata)
        latest = template.tags.get("latest") or next(
            (b.name.rsplit("/", 1)[1] for b in builds if b.state == template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED), ""
        )
        return {
            "templateID": name,
            "buildID": build_uuid(latest),
            "cpuCount": 0,
            "memoryMB": 0,
            "diskSizeMB": template.disk_bytes >> 20,
            "public": template.builtin or template.public,
            "aliases": names,
            "names": names,
            "createdAt": iso(template.create_time),
            "updatedAt": iso(template.update_time),
            "createdBy": None,
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": len(builds) if builds else int(template.builtin),
            "envdVersion": shapes.ENVD_VERSION,
            "buildStatus": BUILD_STATUS.get(builds[0].state, "ready") if builds else "ready",
        }

    async def delete(self, request: web.Request) -> web.Response:
        if is_snapshot(request.match_info["template"]):  # E2B's snapshots are templates too
            return await self.plane.snapshots.delete_snapshot(request)
        name = self._name_only(request.match_info["template"])
        deleted = template_service_pb2.DeleteTemplateRequest(name=f"templates/{name}")
        metadata = self.plane.metadata(request)
        await self.stub.DeleteTemplate(deleted, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
        return web.Response(status=204)

    async def tags(self, request: web.Request) -> web.Response:
        template = await self._template(self._name_only(request.match_info["template"]), self.plane.metadata(request))
        listed = [
            {"tag": tag, "buildID": build_uuid(build), "createdAt": iso(template.tag_times[tag])}
            for tag, build in sorted(template.tags.items())
        ]
        return web.json_response(listed)

    async def assign_tags(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        body = await self.plane.body(request)
        target, tags = body.get("target"), self._tags(body)
        if not isinstance(target, str) or not target:
            raise E2bError(400, "target is required: the template and tag of the build to tag, as name:tag")
        name, _, tag = shapes.our_template(target).partition(":")
        build = await self._build_of(name, tag or "latest", metadata)
        assigned = template_service_pb2.AssignTemplateTagsRequest(build=f"templates/{name}/builds/{build}", tags=tags)
        await self.stub.AssignTemplateTags(assigned, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
        return web.json_response({"tags": tags, "buildID": build_uuid(build)}, status=201)

    async def _build_of(self, name: str, tag: str, metadata) -> str:
        """The build id `name:tag` names now: the tag's, or for an untagged `latest` the newest succeeded build
        (as a create by that name would boot)."""
        template = await self._template(name, metadata)
        if template.builtin:
            raise E2bError(403, f"template {name!r} is built into the installation: its tags cannot change")
        if tag in template.tags:
            return template.tags[tag]
        if tag == "latest":
            for build in await self._builds(name, metadata):
                if build.state == template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED:
                    return build.name.rsplit("/", 1)[1]
        raise E2bError(404, f"template {name!r} has no tag {tag!r}")

    async def remove_tags(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        body = await self.plane.body(request)
        name, tags = body.get("name"), self._tags(body)
        if not isinstance(name, str) or not name:
            raise E2bError(400, "name is required: the template to remove tags from")
        removed = template_service_pb2.RemoveTemplateTagsRequest(
            template=f"templates/{self._name_only(name)}", tags=tags
        )
        await self.stub.RemoveTemplateTags(removed, metadata=metadata, timeout=deadlines.PUBLIC_CALL)
        return web.Response(status=204)

    @staticmethod
    def _tags(body: dict) -> list[str]:
        tags = body.get("tags")
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
            raise E2bError(400, "tags must be a non-empty list of tag names")
        return tags

    @staticmethod
    def _name_only(template_id: str) -> str:
        name, _, tag = shapes.our_template(template_id).partition(":")
        if tag:
            raise E2bError(400, f"{template_id!r}: name the template without a tag here")
        return name
