"""TemplateTags: AssignTemplateTags and RemoveTemplateTags, a template's tags moved by hand (docs/templates.md).

A tag names one build of its template (`Template.tags`); a build that succeeds moves its own tags, and these calls
point tags at an existing succeeded build or take them away. Each call is one etcd transaction on the template's
record (compare its revision, retry when another change came first), so every tag of a call moves together and a
create by `name:tag` sees the old build or the new one, never a mix. Builds are never deleted on their own (only
with their template), so a tag cannot outlive the build it names; removing a tag leaves its build in place.
"""

from __future__ import annotations

from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.types.v1 import template_pb2
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.gateway.template_store import (
    SUCCEEDED,
    TAG,
    TemplateStore,
    parse_build_name,
    parse_reference,
    template_view,
)

MAX_TAGS_PER_TEMPLATE = 64  # a template's tags travel in every GetTemplate and in its etcd record
MAX_TAGS_PER_CALL = 16  # as many as a build may name (build_intake.py)
ATTEMPTS = 10


def checked_tags(tags, limit: int) -> list[str]:
    """The tags of a request, each once, in order; INVALID_ARGUMENT for none, too many or a bad name."""
    unique = list(dict.fromkeys(tags))
    if not unique:
        raise InvalidArgument("name at least one tag", reason="TAGS_EMPTY")
    if len(unique) > limit:
        raise InvalidArgument(f"at most {limit} tags per call (got {len(unique)})", reason="TOO_MANY_TAGS")
    for tag in unique:
        if not TAG.match(tag):
            raise InvalidArgument(f"tag {tag!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}", reason="INVALID_TAG")
    return unique


class TemplateTags:
    def __init__(self, store: TemplateStore) -> None:
        self.store = store

    async def assign(self, request: api.AssignTemplateTagsRequest) -> api.AssignTemplateTagsResponse:
        template, build_id = parse_build_name(request.build)
        tags = checked_tags(request.tags, MAX_TAGS_PER_CALL)
        await self.store.require_own(template)  # PERMISSION_DENIED / NOT_FOUND before anything about the build
        build = await self.store.build(request.build)
        if build.state != SUCCEEDED:
            state = template_pb2.TemplateBuildState.Name(build.state).removeprefix("TEMPLATE_BUILD_STATE_")
            raise FailedPrecondition(
                f"build {request.build!r} is {state.lower()}: only a succeeded build can be tagged",
                reason="BUILD_NOT_SUCCEEDED",
                metadata={"build": request.build},
            )
        for _ in range(ATTEMPTS):
            stored = await self.store.require_own(template)
            record = stored.message
            if len(set(record.tags) | set(tags)) > MAX_TAGS_PER_TEMPLATE:
                raise InvalidArgument(
                    f"template {template!r} would have more than {MAX_TAGS_PER_TEMPLATE} tags: remove some first",
                    reason="TOO_MANY_TAGS",
                )
            record.update_time.GetCurrentTime()
            for tag in tags:
                record.tags[tag] = build_id
                record.tag_times[tag].CopyFrom(record.update_time)
            if await self.store.save(stored):
                return api.AssignTemplateTagsResponse(template=template_view(record))
        raise Aborted("the template kept changing; try again", reason="TEMPLATE_BUSY")

    async def remove(self, request: api.RemoveTemplateTagsRequest) -> api.RemoveTemplateTagsResponse:
        template, _ = parse_reference(request.template, "template")
        if ":" in request.template.removeprefix("templates/"):
            raise InvalidArgument("template takes a name without a tag", reason="INVALID_TEMPLATE_NAME")
        tags = checked_tags(request.tags, MAX_TAGS_PER_TEMPLATE)
        for _ in range(ATTEMPTS):
            stored = await self.store.require_own(template)
            record = stored.message
            missing = [tag for tag in tags if tag not in record.tags]
            if missing:
                present = ", ".join(sorted(record.tags)) or "none"
                raise NotFound(
                    f"template {template!r} has no tag {missing[0]!r} (tags: {present})",
                    reason="TAG_NOT_FOUND",
                    metadata={"template": template, "tag": missing[0]},
                )
            for tag in tags:
                del record.tags[tag]
                if tag in record.tag_times:
                    del record.tag_times[tag]
            record.update_time.GetCurrentTime()
            if await self.store.save(stored):
                return api.RemoveTemplateTagsResponse(template=template_view(record))
        raise Aborted("the template kept changing; try again", reason="TEMPLATE_BUSY")
