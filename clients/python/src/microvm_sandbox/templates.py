"""`client.templates`: build templates and manage them (TemplateService), asynchronously.

    async with AsyncClient() as client:
        build = await client.templates.build(
            Template.from_recipe("mvm.yaml"), on_log=lambda log: print(log.data.decode(), end="")
        )                                           # TemplateBuildFailed if it ends FAILED
        async with AsyncSandbox.create("web", client=client) as sb: ...

A build streams its events: the build record (`TemplateBuild`, first and last), each step's state changes
(`TemplateBuildStep`) and the steps' output (`BuildLog`). Templates and builds are the protobuf messages of
microvm.sandbox.v1 (template_pb2, template_service_pb2). Names: a template is `web` or `templates/web`; a build
`web/ID` or `templates/web/builds/ID`.
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import field_mask_pb2

from microvm.sandbox.v1 import template_pb2, template_service_pb2, template_service_pb2_grpc
from microvm.sandbox.v1 import template_service_pb2 as api
from microvm_sandbox.errors import InvalidArgumentError, NotFoundError
from microvm_sandbox.template import Context, Template
from microvm_sandbox.template_events import AsyncBuildStream, BuildEvent, BuildProgress, BuildSender, build_event

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient

__all__ = [
    "AsyncBuildStream",
    "AsyncTemplates",
    "BuildEvent",
    "BuildProgress",
    "build_event",
    "build_name",
    "build_ref",
    "template_name",
]

LogCallback = Callable[[template_service_pb2.BuildLog], object]
StepCallback = Callable[[template_pb2.TemplateBuildStep], object]
BUILD_TIMEOUT = 3600.0


def template_name(name: str) -> str:
    """`templates/NAME` for `NAME`, `NAME:TAG` or `templates/NAME` (a tag is not part of the name)."""
    bare = name.removeprefix("templates/").partition(":")[0]
    if not bare or "/" in bare:
        raise InvalidArgumentError(f"{name!r} is not a template name")
    return f"templates/{bare}"


def build_name(name: str) -> str:
    """`templates/T/builds/B` for `T/B` or the full name."""
    if name.startswith("templates/"):
        return name
    template, slash, build = name.partition("/")
    if not slash or not template or not build or "/" in build:
        raise InvalidArgumentError(f"{name!r} is not a build: give TEMPLATE/BUILD or templates/T/builds/B")
    return f"templates/{template}/builds/{build}"


def build_ref(name: str) -> str:
    """`T/B` for `templates/T/builds/B` (what `mvm template logs` takes)."""
    parts = name.split("/")
    return f"{parts[1]}/{parts[3]}" if len(parts) == 4 and parts[0] == "templates" else name


async def _deliver(callback: Callable[[Any], object] | None, event: Any) -> None:
    if callback is not None:
        result = callback(event)
        if inspect.isawaitable(result):
            await result


class AsyncTemplates:
    """The templates of the caller's tenant and the public ones (`AsyncClient.templates`): build, follow builds,
    list, get, create, update, delete. Errors are SandboxError subclasses (TemplateNotFound, TemplateInUse,
    TemplateBuildFailed, InvalidArgumentError for a definition the builder refuses, ...)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.stub = template_service_pb2_grpc.TemplateServiceStub(client.channel)  # type: ignore[no-untyped-call]

    async def _call(self, method: str, request: Any, *, idempotent: bool = False) -> Any:
        return await self.client.call(method, request, idempotent=idempotent, stub=self.stub)

    # --- building --------------------------------------------------------------------------------------------
    def build_stream(
        self,
        template: Template,
        name: str | None = None,
        *,
        tags: Sequence[str] = (),
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        context: Context | str | None = None,
        timeout: float | None = BUILD_TIMEOUT,
    ) -> AsyncBuildStream:
        """Starts a build and returns its events as they come (see `build` for the arguments)."""
        target = name or template.name
        if not target:
            raise InvalidArgumentError("the build needs a template name: build(template, 'NAME') or Template('NAME')")
        tag = target.partition(":")[2]
        spec = api.BuildTemplateSpec(
            template=template_name(target),
            build_args=dict(build_args or {}),
            tags=list(dict.fromkeys([*([tag] if tag else []), *tags])),
            no_cache=no_cache,
        )
        if template.source == "dockerfile":
            spec.dockerfile = template.definition
        else:
            spec.recipe = template.definition
        files = Path(context) if isinstance(context, str) else context if context is not None else template.context
        if isinstance(files, Path) and not files.is_dir():
            raise InvalidArgumentError(f"the build context {str(files)!r} is not a directory")
        sender = BuildSender(spec, files)

        def start() -> Any:
            return self.stub.BuildTemplate(sender.requests(), metadata=self.client.metadata, timeout=timeout)

        return AsyncBuildStream(start, sender)

    async def build(
        self,
        template: Template,
        name: str | None = None,
        *,
        tags: Sequence[str] = (),
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        context: Context | str | None = None,
        on_log: LogCallback | None = None,
        on_step: StepCallback | None = None,
        timeout: float | None = BUILD_TIMEOUT,
    ) -> template_pb2.TemplateBuild:
        """Builds `template` as `name` (default: the template's own; `NAME:TAG` moves TAG too) and returns the
        build once it SUCCEEDED: its tags (`tags`, default `latest`) then name it, and `Sandbox.create("NAME")`
        starts from it.

        build_args: ARG values. no_cache: run every step even when its layer is cached. context: the build
        context instead of the template's (a directory, honouring its .mvmignore/.dockerignore, or
        {path: bytes or str}); sent as a tar stream. on_log(BuildLog), on_step(TemplateBuildStep): called with
        each event as it comes (plain or async functions). timeout: seconds before the call gives up
        (TimeoutError; the build goes on on the server). TemplateBuildFailed (with `failure_reason`,
        `failure_message`, `failed_step` and `log_tail`) when it FAILED; InvalidArgumentError when the definition
        is refused."""
        stream = self.build_stream(
            template, name, tags=tags, build_args=build_args, no_cache=no_cache, context=context, timeout=timeout
        )
        return await _follow(stream, on_log, on_step)

    def watch(self, build: str, *, timeout: float | None = BUILD_TIMEOUT) -> AsyncBuildStream:
        """Follows a build (`T/B` or its full name) until it ends: the events the gateway still holds of it (for
        a running build, from its start), then new ones; for a build that ended, its record and the end of its
        log."""
        request = api.WatchTemplateBuildRequest(name=build_name(build))

        def start() -> Any:
            return self.stub.WatchTemplateBuild(request, metadata=self.client.metadata, timeout=timeout)

        return AsyncBuildStream(start)

    async def wait(
        self,
        build: str,
        *,
        on_log: LogCallback | None = None,
        on_step: StepCallback | None = None,
        timeout: float | None = BUILD_TIMEOUT,
    ) -> template_pb2.TemplateBuild:
        """Waits for a build to end, as `build()` does (same callbacks, same TemplateBuildFailed)."""
        return await _follow(self.watch(build, timeout=timeout), on_log, on_step)

    # --- builds ----------------------------------------------------------------------------------------------
    async def get_build(self, build: str) -> template_pb2.TemplateBuild:
        """One build (`T/B` or its full name)."""
        reply = await self._call(
            "GetTemplateBuild", api.GetTemplateBuildRequest(name=build_name(build)), idempotent=True
        )
        found: template_pb2.TemplateBuild = reply.build
        return found

    async def find_build(self, ref: str) -> template_pb2.TemplateBuild:
        """The build `ref` names: `T/B` (or its full name), `T:TAG` (the build the tag names now) or `T` (its
        newest build). NotFoundError when the tag or any build is missing, TemplateNotFound for the template."""
        if "/" in ref.removeprefix("templates/"):
            return await self.get_build(ref)
        name, _, tag = ref.partition(":")
        if tag:
            build = (await self.get(name)).tags.get(tag)
            if not build:
                raise NotFoundError(f"template {name} has no tag {tag!r}", code="NOT_FOUND", reason="TAG_NOT_FOUND")
            return await self.get_build(f"{template_name(name)}/builds/{build}")
        newest = await self.list_builds(name, limit=1)
        if not newest:
            raise NotFoundError(f"template {name} has no builds", code="NOT_FOUND", reason="BUILD_NOT_FOUND")
        return newest[0]

    async def list_builds(
        self, template: str, *, limit: int | None = None
    ) -> builtins.list[template_pb2.TemplateBuild]:
        """A template's builds, newest first: all of them, or the newest `limit`."""
        found: builtins.list[template_pb2.TemplateBuild] = []
        token = ""
        while limit is None or len(found) < limit:
            size = 1000 if limit is None else min(1000, limit - len(found))
            request = api.ListTemplateBuildsRequest(parent=template_name(template), page_size=size, page_token=token)
            reply = await self._call("ListTemplateBuilds", request, idempotent=True)
            found += reply.builds
            token = reply.next_page_token
            if not token:
                break
        return found if limit is None else found[:limit]

    async def get_build_log(self, build: str) -> bytes:
        """The newest part of a build's log (at most 64 KiB), every step's output in order."""
        request = api.GetTemplateBuildLogRequest(name=build_name(build))
        data: bytes = (await self._call("GetTemplateBuildLog", request, idempotent=True)).data
        return data

    # --- templates -------------------------------------------------------------------------------------------
    async def list(self) -> builtins.list[template_pb2.Template]:
        """Every template sandboxes can be created from (the tenant's own and the public ones, builtin included)."""
        return await self.client.list_templates()

    async def get(self, name: str) -> template_pb2.Template:
        """One template: its tags (tag -> build id), owner, description, pool size. TemplateNotFound if none."""
        reply = await self._call("GetTemplate", api.GetTemplateRequest(name=template_name(name)), idempotent=True)
        found: template_pb2.Template = reply.template
        return found

    async def create(
        self, name: str, *, description: str = "", pool_size: int | None = None, public: bool = False
    ) -> template_pb2.Template:
        """An empty template (a build creates one too). ConflictError when the tenant has one of that name.
        public: publish it to every tenant (admins only)."""
        wanted = template_pb2.Template(name=template_name(name), description=description, public=public)
        if pool_size is not None:
            wanted.pool_size = pool_size
        found: template_pb2.Template = (
            await self._call("CreateTemplate", api.CreateTemplateRequest(template=wanted))
        ).template
        return found

    async def update(
        self, name: str, *, description: str | None = None, pool_size: int | None = None
    ) -> template_pb2.Template:
        """Changes a template's description and/or warm pool size (those given)."""
        wanted = template_pb2.Template(name=template_name(name))
        paths: builtins.list[str] = []
        if description is not None:
            wanted.description, paths = description, [*paths, "description"]
        if pool_size is not None:
            wanted.pool_size, paths = pool_size, [*paths, "pool_size"]
        if not paths:
            raise InvalidArgumentError("update(): give description or pool_size")
        request = api.UpdateTemplateRequest(template=wanted, update_mask=field_mask_pb2.FieldMask(paths=paths))
        found: template_pb2.Template = (await self._call("UpdateTemplate", request)).template
        return found

    async def delete(self, name: str, *, force: bool = False) -> None:
        """Deletes a template and its builds. TemplateInUse while sandboxes or snapshots use one of its builds,
        unless force (they keep running; no new ones can be made from it)."""
        await self._call("DeleteTemplate", api.DeleteTemplateRequest(name=template_name(name), force=force))

    async def assign_tags(self, build: str, tags: builtins.list[str]) -> template_pb2.Template:
        """Points tags at a succeeded build (`T/B` or its full name), moving any that named another build; all
        of them or none. Returns the template with its tags as they are now."""
        request = api.AssignTemplateTagsRequest(build=build_name(build), tags=tags)
        found: template_pb2.Template = (await self._call("AssignTemplateTags", request)).template
        return found

    async def remove_tags(self, name: str, tags: builtins.list[str]) -> template_pb2.Template:
        """Removes tags from a template (NotFoundError, nothing removed, when one is not there); builds stay."""
        request = api.RemoveTemplateTagsRequest(template=template_name(name), tags=tags)
        found: template_pb2.Template = (await self._call("RemoveTemplateTags", request)).template
        return found


async def _follow(
    stream: AsyncBuildStream, on_log: LogCallback | None, on_step: StepCallback | None
) -> template_pb2.TemplateBuild:
    progress = BuildProgress()
    async with stream:
        async for event in stream:
            progress.add(event)
            if isinstance(event, template_service_pb2.BuildLog):
                await _deliver(on_log, event)
            elif isinstance(event, template_pb2.TemplateBuildStep):
                await _deliver(on_step, event)
    return progress.result()
