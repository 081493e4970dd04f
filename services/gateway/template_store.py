"""TemplateStore: user templates and their builds (records in etcd, written only by the gateway), as their owners
see them, and how a template reference (`name`, `name:tag`, `templates/name`) becomes an image to boot.

A tenant sees its own templates and the public ones (admins publish those; the built-in images are public too).
A name a tenant does not see is NOT_FOUND, whoever owns it: nothing reveals another tenant's templates. Built-in
names (the installation's images, `default`) are reserved.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from microvm.sandbox.v1 import template_pb2 as api_template
from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import template_pb2
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.common.records import NODES, TEMPLATE_BUILDS, TEMPLATES, Every, Records, Stored
from services.gateway.access import current_principal, current_tenant
from services.gateway.templates import TemplateCatalog

PUBLIC = "_public"
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
BUILD_ID = re.compile(r"^b[0-9a-f]{12}$")
SUCCEEDED = template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED
RUNNING_BUILDS = (template_pb2.TEMPLATE_BUILD_STATE_QUEUED, template_pb2.TEMPLATE_BUILD_STATE_BUILDING)


def parse_reference(text: str, what: str = "template") -> tuple[str, str]:
    """(name, tag) of `name`, `name:tag` or `templates/name[:tag]`; the tag defaults to `latest`."""
    reference = text.removeprefix("templates/")
    name, _, tag = reference.partition(":")
    tag = tag or "latest"
    if not TEMPLATE_NAME.match(name):
        raise InvalidArgument(
            f"{what} {text!r}: a template name is [a-z0-9][a-z0-9-]{{0,62}}, optionally with :tag",
            reason="INVALID_TEMPLATE_NAME",
        )
    if not TAG.match(tag):
        raise InvalidArgument(f"{what} {text!r}: tag {tag!r} is not [A-Za-z0-9_.-]{{1,128}}", reason="INVALID_TAG")
    return name, tag


def owner_key(tenant: str) -> str:
    return tenant or PUBLIC


def caller_tenant() -> str:
    return current_tenant() or "default"


def is_admin() -> bool:
    principal = current_principal()
    return principal is None or principal.role == auth_types.ROLE_ADMIN


@dataclass
class Resolved:
    """What a template reference names now: the image to boot, and (a user template) the build it is."""

    template: str
    tag: str
    image: str
    build: template_pb2.TemplateBuildRecord | None = None
    archive_config: template_pb2.ImageConfig | None = None  # a base made from an image archive

    @property
    def config(self) -> template_pb2.ImageConfig:
        if self.archive_config is not None:
            return self.archive_config
        return self.build.config if self.build is not None else template_pb2.ImageConfig()


def names_of(templates: list[api_template.Template]) -> list[str]:
    return [t.name.removeprefix("templates/") for t in templates]


def build_name(build: template_pb2.TemplateBuildRecord) -> str:
    return f"templates/{build.template}/builds/{build.id}"


def parse_build_name(name: str) -> tuple[str, str]:
    match = re.fullmatch(r"templates/([^/]+)/builds/([^/]+)", name)
    if not match or not TEMPLATE_NAME.match(match.group(1)) or not BUILD_ID.match(match.group(2)):
        raise InvalidArgument(
            f"build name {name!r} is not templates/<template>/builds/<build id>", reason="INVALID_BUILD_NAME"
        )
    return match.group(1), match.group(2)


class TemplateStore:
    def __init__(self, etcd, catalog: TemplateCatalog) -> None:
        self.records, self.catalog = Records(etcd), catalog
        # What a create of a template nobody has hears instead of NOT_FOUND (a built-in recipe builds on first
        # use: template_recipes.py); async (name, tag) -> error or None.
        self.on_missing = None

    async def builtin(self) -> list[str]:
        return names_of(await self.catalog.all())

    async def find(self, name: str) -> Stored[template_pb2.TemplateRecord] | None:
        """The caller's own template of that name, else a public one (both read in one round trip)."""
        own, public = await self.records.get_many(*self._named(name))
        return own or public

    @staticmethod
    def _named(name: str) -> tuple[tuple, tuple]:
        return (TEMPLATES, (owner_key(caller_tenant()), name)), (TEMPLATES, (PUBLIC, name))

    async def require(self, name: str) -> Stored[template_pb2.TemplateRecord]:
        stored = await self.find(name)
        if stored is None:
            raise NotFound(
                f"template {name!r} does not exist", reason="TEMPLATE_NOT_FOUND", metadata={"template": name}
            )
        return stored

    async def require_own(self, name: str) -> Stored[template_pb2.TemplateRecord]:
        """A template the caller may change: its tenant's, or a public one for an admin. A built-in image is
        nobody's to change: PERMISSION_DENIED (TEMPLATE_BUILTIN) says so rather than NOT_FOUND."""
        if await self.find(name) is None and name in await self.builtin():
            raise PermissionDenied(
                f"template {name!r} is built into the installation: it cannot be changed, tagged or deleted",
                reason="TEMPLATE_BUILTIN",
                metadata={"template": name},
            )
        stored = await self.require(name)
        if stored.message.tenant != caller_tenant() and not (stored.message.tenant == "" and is_admin()):
            raise PermissionDenied(
                f"template {name!r} is public: only an admin may change it", reason="TEMPLATE_NOT_OWNED"
            )
        return stored

    async def create(
        self, template: api_template.Template, creator: str = "", system: bool = False
    ) -> template_pb2.TemplateRecord:
        name, _ = parse_reference(template.name, "template.name")
        if ":" in template.name:
            raise InvalidArgument("template.name takes no tag", reason="INVALID_TEMPLATE_NAME")
        if name in await self.builtin():
            raise AlreadyExists(f"template {name!r} is built in: choose another name", reason="TEMPLATE_EXISTS")
        if template.public and not (system or is_admin()):
            raise PermissionDenied("only an admin publishes a public template", reason="PUBLIC_NEEDS_ADMIN")
        if template.HasField("pool_size") and not 0 <= template.pool_size <= 64:
            raise InvalidArgument("pool_size must be between 0 and 64", reason="POOL_SIZE_OUT_OF_RANGE")
        if len(template.description) > 1024:
            raise InvalidArgument("description is longer than 1024 characters", reason="DESCRIPTION_TOO_LONG")
        tenant = "" if template.public else caller_tenant()
        record = template_pb2.TemplateRecord(
            tenant=tenant,
            name=name,
            description=template.description,
            pool_size=template.pool_size if template.HasField("pool_size") else -1,
            creator=creator,
        )
        record.create_time.GetCurrentTime()
        record.update_time.CopyFrom(record.create_time)
        owner = owner_key(tenant)
        created = await self.records.transaction(
            [self.records.unchanged(TEMPLATES, 0, owner, name)], [self.records.put_op(TEMPLATES, record, owner, name)]
        )
        if not created:
            raise AlreadyExists(f"template {name!r} already exists", reason="TEMPLATE_EXISTS")
        return record

    async def save(self, stored: Stored[template_pb2.TemplateRecord]) -> bool:
        record = stored.message
        owner = owner_key(record.tenant)
        return await self.records.transaction(
            [self.records.unchanged(TEMPLATES, stored.revision, owner, record.name)],
            [self.records.put_op(TEMPLATES, record, owner, record.name)],
        )

    async def visible(self) -> list[template_pb2.TemplateRecord]:
        own = await self.records.list(TEMPLATES, owner_key(caller_tenant()))
        public = await self.records.list(TEMPLATES, PUBLIC)
        mine = {s.message.name for s in own}
        return [s.message for s in own] + [s.message for s in public if s.message.name not in mine]

    async def resolve(self, reference: str) -> Resolved:
        """The image a reference boots: a built-in image (tag `latest` only), or the build a user template's tag
        points at. NOT_FOUND (reason TEMPLATE_NOT_FOUND or TAG_NOT_FOUND) otherwise."""
        name, tag = parse_reference(reference)
        # The template records and the nodes' images in one round trip: a create resolves a built-in name mostly.
        own, public, nodes = await self.records.get_many(*self._named(name), Every(NODES))
        stored = own or public
        if stored is None:
            if name in names_of(self.catalog.builtin_on(nodes)) and tag == "latest":
                return Resolved(name, tag, name)
            error = await self.on_missing(name, tag) if self.on_missing is not None else None
            if error is not None:
                raise error
            raise NotFound(
                f"template {reference!r} does not exist", reason="TEMPLATE_NOT_FOUND", metadata={"template": name}
            )
        build_id = stored.message.tags.get(tag)
        if not build_id and tag == "latest":  # untagged `latest`: the newest succeeded build (E2B's default)
            newest = [b for b in await self.builds_of(stored.message) if b.state == SUCCEEDED]
            build_id = max(newest, key=lambda b: b.end_time.ToNanoseconds()).id if newest else ""
        build = await self.records.get(TEMPLATE_BUILDS, build_id) if build_id else None
        if build is None or build.message.state != SUCCEEDED:
            if stored.message.tenant == "" and self.on_missing is not None:  # a built-in recipe not built yet
                error = await self.on_missing(name, tag)
                if error is not None:
                    raise error
            tags = ", ".join(sorted(stored.message.tags)) or "none: it has no successful build yet"
            raise NotFound(
                f"template {name!r} has no tag {tag!r} (tags: {tags})",
                reason="TAG_NOT_FOUND",
                metadata={"template": name, "tag": tag},
            )
        return Resolved(name, tag, build.message.image, build.message)

    async def build(self, name: str) -> template_pb2.TemplateBuildRecord:
        """A build the caller can see, by `templates/<t>/builds/<id>`."""
        template, build_id = parse_build_name(name)
        stored = await self.find(template)
        build = await self.records.get(TEMPLATE_BUILDS, build_id)
        if stored is None or build is None or build.message.template != template:
            raise NotFound(f"build {name!r} does not exist", reason="BUILD_NOT_FOUND", metadata={"build": name})
        if build.message.tenant != stored.message.tenant:
            raise NotFound(f"build {name!r} does not exist", reason="BUILD_NOT_FOUND", metadata={"build": name})
        return build.message

    async def builds_of(self, record: template_pb2.TemplateRecord) -> list[template_pb2.TemplateBuildRecord]:
        builds = [
            s.message
            for s in await self.records.list(TEMPLATE_BUILDS)
            if s.message.template == record.name and s.message.tenant == record.tenant
        ]
        return sorted(builds, key=lambda b: b.create_time.ToNanoseconds(), reverse=True)

    async def put_build(self, build: template_pb2.TemplateBuildRecord) -> None:
        await self.records.put(TEMPLATE_BUILDS, build, build.id)


def template_view(
    record: template_pb2.TemplateRecord, images: dict[str, api_template.Template] | None = None
) -> api_template.Template:
    view = api_template.Template(
        name=f"templates/{record.name}",
        owner=record.tenant,
        description=record.description,
        tags=dict(record.tags),
        public=record.tenant == "",
    )
    for tag in record.tags:  # a record older than tag_times: its last change stands in
        view.tag_times[tag].CopyFrom(record.tag_times[tag] if tag in record.tag_times else record.update_time)
    if record.pool_size >= 0:
        view.pool_size = record.pool_size
    view.create_time.CopyFrom(record.create_time)
    view.update_time.CopyFrom(record.update_time)
    # `images`: what the nodes report per image, keyed here by the build whose image it is (builds of an unchanged
    # plan share their first one's image).
    images = images or {}
    tagged = [record.tags["latest"]] if "latest" in record.tags else [record.tags[t] for t in sorted(record.tags)]
    latest = next((images[build] for build in tagged if build in images), None)
    if latest is not None:  # where the latest build can run, and whether it starts warm
        view.nodes.extend(latest.nodes)
        view.warm, view.disk_bytes = latest.warm, latest.disk_bytes
        view.warm_sizes.extend(latest.warm_sizes)
    return view


def build_view(build: template_pb2.TemplateBuildRecord) -> api_template.TemplateBuild:
    view = api_template.TemplateBuild(
        name=build_name(build),
        state=build.state,
        tags=list(build.tags),
        source=build.source,
        base=build.base,
        node=build.node,
        failure_message=build.failure_message,
        failure_reason=build.failure_reason,
        disk_bytes=build.disk_bytes,
        plan_key=build.plan_key,
        definition=build.definition,
    )
    for index, step in enumerate(build.steps):
        view.steps.append(step_view(index, step))
    view.create_time.CopyFrom(build.create_time)
    if build.HasField("end_time"):
        view.end_time.CopyFrom(build.end_time)
    return view


def step_view(index: int, step: template_pb2.TemplateBuildStepRecord) -> api_template.TemplateBuildStep:
    return api_template.TemplateBuildStep(
        index=index,
        text=step.text,
        state=step.state,
        exit_code=step.exit_code,
        duration_ms=step.duration_ms,
        key=step.key,
    )


def now_ns() -> int:
    return time.time_ns()
