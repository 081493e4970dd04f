"""TemplateBuilds: runs template builds on a node and keeps their records (docs/templates.md).

A build is placed on a node that has its base image (the node of the template's previous build first: its
layers are there). It asks that node's compute which step layers it has; every step up to the first one missing
is CACHED. Each later step that changes files runs in a builder VM booted on its parent's layer (RUN, package
lists, COPY; a WORKDIR that no later step follows creates its directory), and is committed as a layer; ENV, USER
and WORKDIR otherwise only change what later steps and the template's sandboxes get. The top layer is published
as the image `u-<build id>`; compute then boots it once, runs the start command, waits for the ready check and
snapshots it, so its sandboxes start warm. Only then does the build succeed, and its tags move in the same etcd
transaction: a failed build publishes nothing and moves no tag.

The replica running a build writes its record; events go to the caller as they happen (and to watchers on this
replica), the record (steps, state, the end of the log) to etcd at each step. A build whose replica died is
failed by the reaper (`reap`), which any replica runs: no build stays BUILDING forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tarfile
import uuid
from pathlib import Path

import grpc
import structlog

from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import template_pb2 as api_template
from microvm.types.v1 import template_pb2
from services.common.errors import ServiceError, Unavailable, error_info
from services.common.records import TEMPLATE_BUILDS
from services.gateway.build_intake import BuildRequest
from services.gateway.build_run import BuildRun
from services.gateway.build_steps import StepFailed
from services.gateway.build_watch import BuildFeed
from services.gateway.nodes import ClusterNodes
from services.gateway.template_images import TemplateImages
from services.gateway.template_store import (
    RUNNING_BUILDS,
    Resolved,
    TemplateStore,
)

log = structlog.get_logger()
S = template_pb2


def pack_directory(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        tar.add(directory, arcname=".")


def host_ca(path: str) -> bytes:
    try:
        return Path(path).read_bytes() if path else b""
    except OSError:
        return b""


def trust_digest(bundle: bytes) -> str:
    return hashlib.sha256(bundle).hexdigest()[:16] if bundle else ""


def failure_of(error: BaseException) -> tuple[str, str]:
    if isinstance(error, ServiceError):
        return error.reason or "BUILD_FAILED", error.message
    if isinstance(error, grpc.aio.AioRpcError):
        info = error_info(error)
        return (info.reason if info else error.code().name), error.details() or ""
    return "INTERNAL", f"{type(error).__name__}: {error}"


class TemplateBuilds:
    def __init__(self, context, store: TemplateStore, nodes: ClusterNodes, images: TemplateImages) -> None:
        self.context, self.settings = context, context.settings
        self.store, self.nodes, self.images = store, nodes, images
        self.feeds: dict[str, BuildFeed] = {}
        self.tasks: set[asyncio.Task] = set()
        self.ca = host_ca(self.settings.template_host_ca_bundle)

    @property
    def trust(self) -> str:
        return trust_digest(self.ca)

    async def import_archive(self, base, context: Path, disk_mib: int) -> Resolved:
        """A `FROM` image archive made into an image (`u-oci-<digest>`) on a node that has the default image's
        kernel (the one that has it already, if any): the build then runs there."""
        image = "u-oci-" + re.sub(r"[^0-9a-f]", "", (base.digest or "").lower().removeprefix("sha256:"))[:32]
        views = [v for v in (await self.nodes.views([])).values() if v.schedulable and "default" in v.record.templates]
        if not views:
            raise Unavailable("no live node can import an image archive", reason="NO_NODE_FOR_BUILD")
        node = max(views, key=lambda v: (image in v.record.templates, v.memory_mib_free, v.record.name)).record.name
        source = context / base.path
        if source.is_dir():  # an OCI layout directory travels as a tar stream
            packed = source.with_name(source.name + ".mvm-layout.tar")
            await asyncio.to_thread(pack_directory, source, packed)
            source = packed
        header = compute_pb2.ImportImageHeader(image=image, kind=base.kind, size_mib=disk_mib)

        def requests():
            yield compute_pb2.ImportImageRequest(header=header)
            with open(source, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield compute_pb2.ImportImageRequest(data=chunk)

        reply = await self.nodes.on_compute(node, lambda c: c.ImportImage(requests(), timeout=1800))
        return Resolved(base.text, "", image, archive_config=reply.config)

    async def choose_node(self, request: BuildRequest, previous: list[S.TemplateBuildRecord]) -> str:
        alive = [view for view in (await self.nodes.views([])).values() if view.alive and view.schedulable]
        holders = [view for view in alive if request.base.image in view.record.templates]
        if not holders:
            raise Unavailable(f"no live node has the base image {request.base.image!r}", reason="NO_NODE_FOR_BUILD")
        for build in previous:  # where this template's layers are
            for view in holders:
                if view.record.name == build.node:
                    return view.record.name
        return max(holders, key=lambda v: (v.memory_mib_free, v.record.name)).record.name

    async def start(
        self, request: BuildRequest, creator: str, system: bool = False
    ) -> tuple[S.TemplateBuildRecord, BuildFeed]:
        """Records the build (QUEUED, the template created when new) and starts it; returns its feed. `system`:
        the installation's own build of a built-in recipe (a public template, whoever's create asked for it)."""
        stored = await self.store.find(request.name)
        if stored is not None and not system:
            stored = await self.store.require_own(request.name)
        previous = await self.store.builds_of(stored.message) if stored is not None else []
        node = await self.choose_node(request, previous)  # before a new template is made: none is left empty
        if stored is None:
            wanted = api_template.Template(name=f"templates/{request.name}", public=system)
            await self.store.create(wanted, creator, system=system)
            stored = await self.store.require(request.name)
        template = stored.message
        build = S.TemplateBuildRecord(
            id=f"b{uuid.uuid4().hex[:12]}",
            tenant=template.tenant,
            template=template.name,
            tags=request.tags,
            state=S.TEMPLATE_BUILD_STATE_QUEUED,
            node=node,
            source=request.source,
            definition=request.text,
            base=request.plan.base.text,
            base_image=request.base.image,
            plan_key=request.plan.key,
            runner=self.context.instance_id,
            creator=creator,
        )
        for step in request.plan.steps:
            build.steps.append(
                S.TemplateBuildStepRecord(text=step.text, key=step.key, state=S.TEMPLATE_STEP_STATE_PENDING)
            )
        build.create_time.GetCurrentTime()
        await self.store.put_build(build)
        feed = self.feeds[build.id] = BuildFeed()
        same = next((b for b in previous if self.reusable(b, request)), None)
        task = asyncio.create_task(self._run(build, request, template, feed, same), name=f"build-{build.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return build, feed

    def reusable(self, previous: S.TemplateBuildRecord, request: BuildRequest) -> bool:
        """A succeeded build of the same plan whose image is still on a live node: a rebuild with no change
        publishes nothing new, it points the tags at that image again."""
        return (
            not request.spec.no_cache
            and previous.state == S.TEMPLATE_BUILD_STATE_SUCCEEDED
            and previous.plan_key == request.plan.key
            and bool(previous.image)
            and self.nodes.alive(previous.node)
        )

    async def _run(self, build, request: BuildRequest, template, feed: BuildFeed, same=None) -> None:
        run = BuildRun(self, build, request, template, feed)
        try:
            if same is not None:
                await run.reuse(same)
                return
            await asyncio.wait_for(run.execute(), self.settings.template_build_timeout_seconds)
        except TimeoutError:
            await run.fail("BUILD_TIMEOUT", f"the build ran past {self.settings.template_build_timeout_seconds}s")
        except asyncio.CancelledError:
            await asyncio.shield(run.fail("BUILDER_LOST", "the gateway running the build shut down"))
            raise
        except StepFailed as exc:
            await run.fail("BUILD_STEP_FAILED", str(exc), exit_code=exc.exit_code)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            await run.fail(*failure_of(exc))
        except Exception as exc:  # a bug: say so, never leave the build BUILDING
            log.exception("template_build_crashed", build=build.id)
            await run.fail(*failure_of(exc))
        finally:
            request.discard()
            feed.close()
            asyncio.get_running_loop().call_later(60, self.feeds.pop, build.id, None)

    async def reap(self) -> None:
        """Fails builds whose gateway replica is gone (their task died with it)."""
        live = {i.instance_id for i in self.context.directory.instances("gateway")} | {self.context.instance_id}
        for stored in await self.store.records.list(TEMPLATE_BUILDS):
            build = stored.message
            if build.state in RUNNING_BUILDS and build.runner not in live and build.id not in self.feeds:
                build.state = S.TEMPLATE_BUILD_STATE_FAILED
                build.failure_reason = "BUILDER_LOST"
                build.failure_message = "the gateway replica running the build went away; build it again"
                build.end_time.GetCurrentTime()
                await self.store.records.transaction(
                    [self.store.records.unchanged(TEMPLATE_BUILDS, stored.revision, build.id)],
                    [self.store.records.put_op(TEMPLATE_BUILDS, build, build.id)],
                )

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
