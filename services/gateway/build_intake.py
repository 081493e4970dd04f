"""BuildIntake: a BuildTemplate call's request stream to a checked build: the spec, the build context (a tar stream
unpacked into a directory of its own, bounded, nothing escaping it), the plan (images/definition) and the base it
resolves to now. Every problem with the input is INVALID_ARGUMENT naming the line or key; an unknown base is
NOT_FOUND; nothing is built or recorded before all of it passed.
"""

from __future__ import annotations

import asyncio
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from images.definition import (
    Base,
    BuildPlan,
    ContextLimits,
    DefinitionError,
    ResolvedBase,
    plan_dockerfile,
    plan_recipe,
)
from images.definition.plan import DEFAULT_BASE_ENV
from microvm.sandbox.v1 import template_service_pb2 as api
from services.common.client_streams import lead_message
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unimplemented
from services.gateway.template_store import TAG, Resolved, TemplateStore, parse_reference

MAX_DEFINITION = 1 << 20


@dataclass
class BuildRequest:
    spec: api.BuildTemplateSpec
    name: str
    tags: list[str]
    source: str
    text: str
    context: Path | None
    plan: BuildPlan
    base: Resolved
    base_env: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        if self.context is not None:
            shutil.rmtree(self.context.parent, ignore_errors=True)


def invalid(error: DefinitionError) -> InvalidArgument:
    return InvalidArgument(str(error), reason=error.reason, metadata=error.metadata())


async def receive(requests, work_root: Path, max_bytes: int) -> tuple[api.BuildTemplateSpec, Path | None]:
    """The spec, and the context unpacked under `work_root` (None when the caller sent no context). The spec is
    checked before any of the context is read: a bad one is refused before the upload."""
    spec, iterator = await lead_message(requests, "spec", "BuildTemplate", "SPEC_MISSING")
    check_spec(spec)
    work = work_root / f"ctx-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    archive, received = work / "context.tar", 0
    try:
        with open(archive, "wb") as out:
            async for message in iterator:
                if message.WhichOneof("part") != "context":
                    raise InvalidArgument("only the first message may carry the spec", reason="SPEC_REPEATED")
                received += len(message.context)
                if received > max_bytes:
                    raise ResourceExhausted(
                        f"the build context is larger than {max_bytes} bytes (gateway.template_context_max_bytes)",
                        reason="CONTEXT_TOO_LARGE",
                    )
                out.write(message.context)
        if received == 0:
            shutil.rmtree(work)
            return spec, None
        directory = work / "context"
        await asyncio.to_thread(unpack, archive, directory)
        archive.unlink()
        return spec, directory
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def unpack(archive: Path, directory: Path) -> None:
    """Unpacks the context; absolute paths, `..`, devices and links leading out of it are refused."""
    directory.mkdir()
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
    except tarfile.FilterError as exc:
        raise InvalidArgument(
            f"the build context has an entry leading outside it: {exc}", reason="SYMLINK_OUTSIDE_CONTEXT"
        ) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidArgument(
            f"the build context is not a readable tar stream: {exc}", reason="INVALID_CONTEXT"
        ) from None


def check_spec(spec: api.BuildTemplateSpec) -> tuple[str, list[str], str, str]:
    """(template name, tags, source, text)."""
    if not spec.template:
        raise InvalidArgument("spec.template is required (templates/<name>)", reason="INVALID_TEMPLATE_NAME")
    name, tag = parse_reference(spec.template, "spec.template")
    if ":" in spec.template.removeprefix("templates/"):
        raise InvalidArgument("spec.template takes no tag: put tags in spec.tags", reason="INVALID_TEMPLATE_NAME")
    if bool(spec.dockerfile) == bool(spec.recipe):
        raise InvalidArgument("give exactly one of spec.dockerfile and spec.recipe", reason="DEFINITION_MISSING")
    text = spec.dockerfile or spec.recipe
    if len(text.encode()) > MAX_DEFINITION:
        raise InvalidArgument("the definition is larger than 1 MiB", reason="DEFINITION_TOO_LARGE")
    tags = list(dict.fromkeys(spec.tags)) or ["latest"]
    for tag in tags:
        if not TAG.match(tag):
            raise InvalidArgument(f"tag {tag!r} is not [A-Za-z0-9_.-]{{1,128}}", reason="INVALID_TAG")
    if len(tags) > 16:
        raise InvalidArgument("at most 16 tags per build", reason="TOO_MANY_TAGS")
    return name, tags, "dockerfile" if spec.dockerfile else "recipe", text


def make_plan(source: str, text: str, context: Path | None, build_args, resolve=None) -> BuildPlan:
    planner = plan_dockerfile if source == "dockerfile" else plan_recipe
    try:
        return planner(text, context, dict(build_args), ContextLimits(), resolve)
    except DefinitionError as exc:
        raise invalid(exc) from None


async def intake(
    spec: api.BuildTemplateSpec, context: Path | None, store: TemplateStore, trust_digest: str, import_archive=None
) -> BuildRequest:
    """The checked build. `trust_digest` (the host CA bundle's hash, or "") is part of every layer key: a
    builder that trusts another bundle builds other layers."""
    name, tags, source, text = check_spec(spec)
    first = make_plan(source, text, context, spec.build_args)
    if first.base.kind != "template":
        # An image archive in the context: made into an image on a node now (its config is the base's env).
        base = await import_archive(first.base, context, first.resources.disk_mib or 0)
    else:
        base = await resolve_base(first.base, store)
    env = dict(base.config.env) if base.build is not None or base.archive_config is not None else dict(DEFAULT_BASE_ENV)
    if base.archive_config is not None:
        digest = f"archive:{first.base.digest}"
    elif base.build is not None:
        digest = base.build.id
    else:  # a built-in image's current build: rebuilding the image rebuilds what stands on it
        digest = f"builtin:{base.image}@{(await store.catalog.image_builds()).get(base.image, '')}"
    digest += f"+ca:{trust_digest}"
    config = base.config
    resolved = ResolvedBase(digest, tuple(sorted(env.items())), config.workdir or "/", config.user or None)
    plan = make_plan(source, text, context, spec.build_args, lambda _: resolved)
    return BuildRequest(spec, name, tags, source, text, context, plan, base, env)


async def resolve_base(base: Base, store: TemplateStore) -> Resolved:
    """What the base names now: a built-in image or a template's build (a template may build on its own
    previous build). NOT_FOUND for an unknown template or tag."""
    if base.kind != "template":
        raise Unimplemented(f"FROM an image archive ({base.kind})")
    resolved = await store.resolve(f"{base.name}:{base.tag or 'latest'}")
    if resolved.build is not None and not resolved.image:
        raise FailedPrecondition(f"template {base.text} has no image", reason="BASE_NOT_READY")
    return resolved
