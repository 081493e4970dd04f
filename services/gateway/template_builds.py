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
import time
import uuid
from collections import deque
from pathlib import Path

import grpc
import structlog

from images.definition import CopyStep, EnvStep, PackagesStep, RunStep, UserStep, WorkdirStep
from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import template_pb2 as api_template
from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import template_pb2
from services.common import deadlines
from services.common.errors import ServiceError, Unavailable, error_info
from services.common.records import TEMPLATE_BUILDS, TEMPLATES
from services.gateway.build_intake import BuildRequest
from services.gateway.build_steps import HOST_CA_PATH, StepFailed, StepRunner, ca_env
from services.gateway.build_watch import BuildFeed
from services.gateway.nodes import ClusterNodes
from services.gateway.template_store import (
    RUNNING_BUILDS,
    Resolved,
    TemplateStore,
    build_view,
    owner_key,
    step_view,
)

log = structlog.get_logger()
LOG_TAIL = 64 << 10
FS_STEPS = (RunStep, PackagesStep, CopyStep)
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
    def __init__(self, context, store: TemplateStore, nodes: ClusterNodes) -> None:
        self.context, self.settings = context, context.settings
        self.store, self.nodes = store, nodes
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

    async def start(self, request: BuildRequest, creator: str) -> tuple[S.TemplateBuildRecord, BuildFeed]:
        """Records the build (QUEUED, the template created when new) and starts it; returns its feed."""
        stored = await self.store.find(request.name)
        if stored is None:
            await self.store.create(api_template.Template(name=f"templates/{request.name}"), creator)
            stored = await self.store.require(request.name)
        else:
            stored = await self.store.require_own(request.name)
        template = stored.message
        previous = await self.store.builds_of(template)
        node = await self.choose_node(request, previous)
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


class BuildRun:
    """One build being executed."""

    def __init__(self, builds: TemplateBuilds, build, request: BuildRequest, template, feed: BuildFeed) -> None:
        self.builds, self.build, self.request, self.template, self.feed = builds, build, request, template, feed
        self.nodes, self.store = builds.nodes, builds.store
        self.tail: deque[bytes] = deque()
        self.tail_bytes = 0
        self.started = time.monotonic()
        self.step_index = -1

    def remaining(self) -> float:
        return self.builds.settings.template_build_timeout_seconds - (time.monotonic() - self.started)

    async def log(self, data: bytes) -> None:
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes > LOG_TAIL and len(self.tail) > 1:
            self.tail_bytes -= len(self.tail.popleft())
        self.feed.emit(api.BuildTemplateResponse(log=api.BuildLog(step=max(self.step_index, 0), data=data)))

    async def save(self) -> None:
        self.build.log_tail = b"".join(self.tail)[-LOG_TAIL:]
        await self.store.put_build(self.build)

    async def set_step(self, index: int, state: int, **fields) -> None:
        step = self.build.steps[index]
        step.state = state
        for name, value in fields.items():
            setattr(step, name, value)
        self.feed.emit(api.BuildTemplateResponse(step=step_view(index, step)))
        await self.save()

    async def compute(self, method: str, request, timeout: float):
        return await self.nodes.on_compute(self.build.node, lambda c: getattr(c, method)(request, timeout=timeout))

    async def execute(self) -> None:
        plan, build = self.request.plan, self.build
        build.state = S.TEMPLATE_BUILD_STATE_BUILDING
        await self.save()
        self.feed.emit(api.BuildTemplateResponse(build=build_view(build)))
        fs_keys = [step.key for step in plan.steps if isinstance(step, FS_STEPS)]
        present = set()
        if fs_keys and not self.request.spec.no_cache:
            found = await self.compute(
                "FindLayers", compute_pb2.FindLayersRequest(keys=fs_keys, base_image=build.base_image), deadlines.QUICK
            )
            present = set(found.present)
        base = self.request.base.config  # a template base's own working directory and user carry on
        env, workdir, user = dict(self.request.base_env), base.workdir or "/", base.user
        parent, cached = "", True
        fs_indexes = [i for i, s in enumerate(plan.steps) if isinstance(s, FS_STEPS)]
        last_fs = max(fs_indexes, default=-1)
        first_miss = next((i for i in fs_indexes if plan.steps[i].key not in present), len(plan.steps))

        def reused(index: int) -> bool:
            """A step that changes no files counts as cached when the layers around it were."""
            if index >= first_miss:
                return False
            return any(index < i < first_miss for i in fs_indexes) or (first_miss == len(plan.steps) and fs_indexes)

        for index, step in enumerate(plan.steps):
            self.step_index = index
            if isinstance(step, EnvStep):
                env.update(dict(step.values))
            elif isinstance(step, UserStep):
                user = step.user
            elif isinstance(step, WorkdirStep):
                workdir = step.path
            makes_files = isinstance(step, FS_STEPS) or (isinstance(step, WorkdirStep) and index > last_fs)
            if not makes_files:
                await self.set_step(
                    index, S.TEMPLATE_STEP_STATE_CACHED if reused(index) else S.TEMPLATE_STEP_STATE_DONE
                )
                continue
            if cached and step.key in present:
                await self.set_step(index, S.TEMPLATE_STEP_STATE_CACHED)
                parent = step.key
                continue
            cached = False
            began = time.monotonic()
            await self.set_step(index, S.TEMPLATE_STEP_STATE_RUNNING)
            await self.log(f"--> {step.text}\n".encode())
            try:
                await self.run_step(step, parent, env, workdir, user)
            except StepFailed as exc:
                await self.set_step(
                    index,
                    S.TEMPLATE_STEP_STATE_FAILED,
                    exit_code=exc.exit_code,
                    duration_ms=int((time.monotonic() - began) * 1000),
                )
                raise
            except BaseException:
                await self.set_step(
                    index, S.TEMPLATE_STEP_STATE_FAILED, duration_ms=int((time.monotonic() - began) * 1000)
                )
                raise
            await self.set_step(index, S.TEMPLATE_STEP_STATE_DONE, duration_ms=int((time.monotonic() - began) * 1000))
            parent = step.key
        self.step_index = len(plan.steps)
        await self.publish(parent, env, workdir, user)

    async def run_step(self, step, parent: str, env: dict[str, str], workdir: str, user: str) -> None:
        settings, build = self.builds.settings, self.build
        vm_id = f"bld-{build.id}-{self.step_index}"
        start = compute_pb2.StartBuilderVmRequest(
            vm_id=vm_id,
            base_image=build.base_image,
            parent_layer=parent,
            vcpus=settings.template_builder_vcpus,
            memory_mib=settings.template_builder_memory_mib,
            network_policy=network_types.NetworkPolicy(egress=self.egress()),
            disk_mib=self.request.plan.resources.disk_mib or 0,
        )
        await self.compute("StartBuilderVm", start, deadlines.VM_START)
        committed = False
        try:
            runner = StepRunner(self.nodes.relay(build.node), vm_id, self.log, self.remaining)
            step_env = dict(env)
            if self.builds.ca:
                await runner.write(HOST_CA_PATH, self.builds.ca)
                step_env.update(ca_env())
            if workdir != "/":
                await runner.make_dir(workdir)
            if isinstance(step, (RunStep, PackagesStep)):
                step_env.update(dict(step.build_args))
                step_env.update(dict(self.request.plan.proxy_args))
                as_user = "root" if isinstance(step, PackagesStep) else user
                await runner.run(step.command.as_argv(), step_env, workdir, as_user)
            elif isinstance(step, CopyStep):
                await runner.copy(self.request.context, step, step_env)
            commit = compute_pb2.CommitBuilderVmRequest(vm_id=vm_id, layer=step.key)
            reply = await self.compute("CommitBuilderVm", commit, deadlines.SNAPSHOT)
            committed = True
            await self.log(f"layer {step.key[:12]}: {reply.layer_bytes} bytes\n".encode())
        finally:
            if not committed:
                try:
                    delete = compute_pb2.DeleteVmRequest(vm_id=vm_id)
                    await asyncio.shield(self.compute("DeleteVm", delete, deadlines.CONTROL))
                except (ServiceError, grpc.aio.AioRpcError) as exc:
                    log.warning("builder_vm_delete_failed", vm=vm_id, error=str(exc))

    def egress(self) -> int:
        if not self.builds.context.common.networking:
            return network_types.EGRESS_MODE_NONE
        return network_types.EGRESS_MODE_FULL

    def image_config(self, env: dict[str, str], workdir: str, user: str) -> S.ImageConfig:
        plan = self.request.plan
        config = S.ImageConfig(env=env, workdir=workdir if workdir != "/" else "", user=user or "", build=self.build.id)
        if self.builds.ca:
            config.env.update({name: value for name, value in ca_env().items() if name not in env})
        if plan.start is not None:
            config.start_argv.extend(plan.start.as_argv())
        if plan.ready is not None:
            if plan.ready.command is not None:
                config.ready_argv.extend(plan.ready.command.as_argv())
            config.ready_port = plan.ready.port or 0
            config.ready_timeout_seconds = plan.ready.timeout_seconds
        config.vcpus = plan.resources.vcpus or 0
        config.memory_mib = plan.resources.memory_mib or 0
        pool = self.template.pool_size if self.template.pool_size >= 0 else plan.pool_size
        config.pool_size = pool if pool is not None else 0
        return config

    async def reuse(self, same: S.TemplateBuildRecord) -> None:
        build = self.build
        for index in range(len(build.steps)):
            await self.set_step(index, S.TEMPLATE_STEP_STATE_CACHED)
        await self.log(f"--> unchanged since build {same.id}: its image {same.image} is reused\n".encode())
        build.node, build.image, build.disk_bytes = same.node, same.image, same.disk_bytes
        build.config.CopyFrom(same.config)
        build.config.build = same.config.build or same.id
        await self.finish()

    async def publish(self, layer: str, env: dict[str, str], workdir: str, user: str) -> None:
        build = self.build
        build.image = f"u-{build.id}"
        build.config.CopyFrom(self.image_config(env, workdir, user))
        await self.log(f"--> publishing {build.image}\n".encode())
        request = compute_pb2.PublishImageRequest(
            image=build.image, base_image=build.base_image, layer=layer, config=build.config
        )
        reply = await self.compute("PublishImage", request, deadlines.SNAPSHOT)
        build.disk_bytes = reply.disk_bytes
        await self.finish()

    async def finish(self) -> None:
        """SUCCEEDED and the tags moved, in one transaction (retried when the template changed meanwhile)."""
        build, records = self.build, self.store.records
        build.state = S.TEMPLATE_BUILD_STATE_SUCCEEDED
        build.end_time.GetCurrentTime()
        build.log_tail = b"".join(self.tail)[-LOG_TAIL:]
        owner = owner_key(build.tenant)
        for _ in range(20):
            stored = await records.get(TEMPLATES, owner, build.template)
            if stored is None:
                await self.fail("TEMPLATE_DELETED", "the template was deleted during its build")
                return
            template = stored.message
            for tag in build.tags:
                template.tags[tag] = build.id
            template.update_time.GetCurrentTime()
            if await records.transaction(
                [records.unchanged(TEMPLATES, stored.revision, owner, build.template)],
                [
                    records.put_op(TEMPLATES, template, owner, build.template),
                    records.put_op(TEMPLATE_BUILDS, build, build.id),
                ],
            ):
                self.feed.emit(api.BuildTemplateResponse(build=build_view(build)))
                log.info("template_built", build=build.id, template=build.template, tags=list(build.tags))
                return
        await self.fail("TEMPLATE_BUSY", "the template kept changing while its tags were being moved")

    async def fail(self, reason: str, message: str, exit_code: int = 0) -> None:
        build = self.build
        build.state = S.TEMPLATE_BUILD_STATE_FAILED
        build.failure_reason = reason
        lines = b"".join(self.tail)[-4096:].decode(errors="replace").splitlines()[-10:]
        where = (
            f"step {self.step_index + 1} ({build.steps[self.step_index].text})"
            if 0 <= self.step_index < len(build.steps)
            else ""
        )
        build.failure_message = f"{where}: {message}" if where else message
        if lines and reason == "BUILD_STEP_FAILED":
            build.failure_message += "\n" + "\n".join(lines)
        build.end_time.GetCurrentTime()
        try:
            await self.save()
        except Exception as exc:  # etcd away: the reaper fails it later
            log.warning("template_build_record_failed", build=build.id, error=str(exc))
        self.feed.emit(api.BuildTemplateResponse(build=build_view(build)))
        log.info("template_build_failed", build=build.id, reason=reason)
