"""`Client.templates`: the template API for synchronous code, each method the `AsyncTemplates` one run on the SDK's
loop (microvm_sandbox.templates has the details).

    with Client() as client:
        build = client.templates.build(Template.from_dockerfile("Dockerfile"), "web:v1")
        for event in client.templates.watch("web/" + build.name.rsplit("/", 1)[1]): ...
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping, Sequence

from microvm.sandbox.v1 import template_pb2
from microvm_sandbox.files_sync import Runner
from microvm_sandbox.template import Context, Template
from microvm_sandbox.templates import (
    BUILD_TIMEOUT,
    AsyncBuildStream,
    AsyncTemplates,
    BuildEvent,
    LogCallback,
    StepCallback,
)


class BuildStream:
    """The events of one build for a plain `for` loop (see `AsyncBuildStream`); `build` is the newest build record
    seen. Stopping early (`close()`, leaving `with`) stops following; the build goes on on the server."""

    def __init__(self, inner: AsyncBuildStream, run: Runner) -> None:
        self.aio, self._run = inner, run

    @property
    def build(self) -> template_pb2.TemplateBuild | None:
        """The newest build record the events carried (None before the first)."""
        return self.aio.build

    def __iter__(self) -> Iterator[BuildEvent]:
        while True:
            try:
                yield self._run(self.aio.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        """Stops following (the build goes on). Safe to call twice."""
        self._run(self.aio.aclose())

    def __enter__(self) -> BuildStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Templates:
    """Templates for synchronous code (`Client.templates`): the methods of `AsyncTemplates`, same arguments."""

    def __init__(self, inner: AsyncTemplates, run: Runner) -> None:
        self.aio, self._run = inner, run

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
    ) -> BuildStream:
        """Starts a build and returns its events as they come."""
        inner = self.aio.build_stream(
            template, name, tags=tags, build_args=build_args, no_cache=no_cache, context=context, timeout=timeout
        )
        return BuildStream(inner, self._run)

    def build(
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
        """Builds `template` and returns the build once it SUCCEEDED; TemplateBuildFailed when it FAILED. The
        callbacks run on the SDK's event loop thread."""
        return self._run(
            self.aio.build(
                template,
                name,
                tags=tags,
                build_args=build_args,
                no_cache=no_cache,
                context=context,
                on_log=on_log,
                on_step=on_step,
                timeout=timeout,
            )
        )

    def watch(self, build: str, *, timeout: float | None = BUILD_TIMEOUT) -> BuildStream:
        """Follows a build (`T/B` or its full name) until it ends."""
        return BuildStream(self.aio.watch(build, timeout=timeout), self._run)

    def wait(
        self,
        build: str,
        *,
        on_log: LogCallback | None = None,
        on_step: StepCallback | None = None,
        timeout: float | None = BUILD_TIMEOUT,
    ) -> template_pb2.TemplateBuild:
        """Waits for a build to end, as `build()` does."""
        return self._run(self.aio.wait(build, on_log=on_log, on_step=on_step, timeout=timeout))

    def get_build(self, build: str) -> template_pb2.TemplateBuild:
        """One build (`T/B` or its full name)."""
        return self._run(self.aio.get_build(build))

    def find_build(self, ref: str) -> template_pb2.TemplateBuild:
        """The build `ref` names: `T/B`, `T:TAG` (the build the tag names now) or `T` (its newest build)."""
        return self._run(self.aio.find_build(ref))

    def list_builds(self, template: str, *, limit: int | None = None) -> builtins.list[template_pb2.TemplateBuild]:
        """A template's builds, newest first (all, or the newest `limit`)."""
        return self._run(self.aio.list_builds(template, limit=limit))

    def get_build_log(self, build: str) -> bytes:
        """The newest part of a build's log (at most 64 KiB)."""
        return self._run(self.aio.get_build_log(build))

    def list(self) -> builtins.list[template_pb2.Template]:
        """Every template sandboxes can be created from."""
        return self._run(self.aio.list())

    def get(self, name: str) -> template_pb2.Template:
        """One template. TemplateNotFound if none."""
        return self._run(self.aio.get(name))

    def create(
        self, name: str, *, description: str = "", pool_size: int | None = None, public: bool = False
    ) -> template_pb2.Template:
        """An empty template."""
        return self._run(self.aio.create(name, description=description, pool_size=pool_size, public=public))

    def update(
        self, name: str, *, description: str | None = None, pool_size: int | None = None
    ) -> template_pb2.Template:
        """Changes a template's description and/or warm pool size."""
        return self._run(self.aio.update(name, description=description, pool_size=pool_size))

    def delete(self, name: str, *, force: bool = False) -> None:
        """Deletes a template and its builds (TemplateInUse unless force while in use)."""
        self._run(self.aio.delete(name, force=force))

    def assign_tags(self, build: str, tags: builtins.list[str]) -> template_pb2.Template:
        """Points tags at a succeeded build (`T/B`), moving any that named another build."""
        return self._run(self.aio.assign_tags(build, tags))

    def remove_tags(self, name: str, tags: builtins.list[str]) -> template_pb2.Template:
        """Removes tags from a template; its builds stay."""
        return self._run(self.aio.remove_tags(name, tags))
