"""BuildRun: one template build being executed (see template_builds.py for the whole story): its steps in
builder VMs on the build's node, its events and record, and publishing its image with the tags moved."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import grpc
import structlog

from images.definition import CopyStep, EnvStep, PackagesStep, RunStep, UserStep, WorkdirStep
from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import template_pb2
from services.common import deadlines
from services.common.errors import ServiceError
from services.common.records import TEMPLATE_BUILDS, TEMPLATES
from services.gateway.build_intake import BuildRequest
from services.gateway.build_steps import HOST_CA_PATH, StepFailed, StepRunner, ca_env
from services.gateway.build_watch import BuildFeed
from services.gateway.template_store import build_view, owner_key, step_view

log = structlog.get_logger()
LOG_TAIL = 64 << 10
FS_STEPS = (RunStep, PackagesStep, CopyStep)
S = template_pb2


class BuildRun:
    """One build being executed."""

    def __init__(self, builds, build, request: BuildRequest, template, feed: BuildFeed) -> None:
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
        # Steps that change files (each a layer): RUN, package lists, COPY, and a WORKDIR no such step follows
        # (it creates its directory).
        last_fs = max((i for i, s in enumerate(plan.steps) if isinstance(s, FS_STEPS)), default=-1)
        fs_indexes = [
            i
            for i, s in enumerate(plan.steps)
            if isinstance(s, FS_STEPS) or (isinstance(s, WorkdirStep) and i > last_fs)
        ]
        fs_keys = [plan.steps[i].key for i in fs_indexes]
        present = set()
        if fs_keys and not self.request.spec.no_cache:
            found = await self.compute(
                "FindLayers", compute_pb2.FindLayersRequest(keys=fs_keys, base_image=build.base_image), deadlines.QUICK
            )
            present = set(found.present)
        base = self.request.base.config  # a template base's own working directory and user carry on
        env, workdir, user = dict(self.request.base_env), base.workdir or "/", base.user
        parent, cached = "", True
        first_miss = next((i for i in fs_indexes if plan.steps[i].key not in present), len(plan.steps))

        def reused(index: int) -> bool:
            """A step that changes no files counts as cached when a cached layer follows it."""
            return any(index < i < first_miss for i in fs_indexes)

        for index, step in enumerate(plan.steps):
            self.step_index = index
            if isinstance(step, EnvStep):
                env.update(dict(step.values))
            elif isinstance(step, UserStep):
                user = step.user
            elif isinstance(step, WorkdirStep):
                workdir = step.path
            if index not in fs_indexes:
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

    def image_config(self, env: dict[str, str], workdir: str, user: str, has_ca: bool) -> S.ImageConfig:
        """`has_ca`: the image holds the host's CA bundle (every layer's builder wrote it; a build with no layer
        of its own has only its base's files)."""
        plan = self.request.plan
        config = S.ImageConfig(env=env, workdir=workdir if workdir != "/" else "", user=user or "", build=self.build.id)
        if self.builds.ca and has_ca:
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
        build.config.CopyFrom(self.image_config(env, workdir, user, has_ca=bool(layer)))
        await self.log(f"--> publishing {build.image}\n".encode())
        request = compute_pb2.PublishImageRequest(
            image=build.image, base_image=build.base_image, layer=layer, config=build.config
        )
        reply = await self.compute("PublishImage", request, deadlines.SNAPSHOT)
        build.disk_bytes = reply.disk_bytes
        try:
            await self.builds.images.charge(build.tenant, build.image, build.disk_bytes)
        except BaseException:  # over quota: nothing half-built stays published
            await asyncio.shield(self.builds.images.drop(build.node, build.image, ""))
            build.image = ""
            raise
        await self.replicate()
        await self.finish()

    async def replicate(self) -> None:
        """A second node fetches the image (through the snapshot stores), so the template outlives the node that
        built it. Best effort: a cluster of one node has no other, and a failure leaves the build good."""
        build = self.build
        views = await self.nodes.views([])
        others = [
            v
            for v in views.values()
            if v.schedulable and v.record.name != build.node and "default" in v.record.templates
        ]
        if not others:
            return
        target = max(others, key=lambda v: (v.memory_mib_free, v.record.name)).record.name
        await self.log(f"--> copying {build.image} to node {target}\n".encode())
        try:
            request = compute_pb2.FetchImageRequest(image=build.image)
            await self.nodes.on_compute(target, lambda c: c.FetchImage(request, timeout=deadlines.SNAPSHOT))
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            await self.log(f"the copy failed; the image is on node {build.node} only: {exc}\n".encode())

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
            before = set(template.tags.values())
            for tag in build.tags:
                template.tags[tag] = build.id
                template.tag_times[tag].CopyFrom(build.end_time)
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
                await self.release_pools(before - set(template.tags.values()), set(template.tags.values()))
                return
        await self.fail("TEMPLATE_BUSY", "the template kept changing while its tags were being moved")

    async def release_pools(self, superseded: set[str], current: set[str]) -> None:
        """The warm pools of builds no tag names any more go to 0 on every node that has them: a pool is for the
        template's current builds (each pooled VM is a guest running on the node's CPUs). An image a current build
        reuses (an unchanged rebuild) keeps its pool. Best effort: a node away keeps its pool until the next change."""
        records = self.store.records
        kept = {s.message.image for b in current if (s := await records.get(TEMPLATE_BUILDS, b)) is not None}
        for build_id in sorted(superseded):
            stored = await records.get(TEMPLATE_BUILDS, build_id)
            if stored is None or not stored.message.image or stored.message.image in kept:
                continue
            request = compute_pb2.SetImagePoolSizeRequest(image=stored.message.image, pool_size=0)
            for view in (await self.nodes.views([])).values():
                if not (view.alive and request.image in view.record.templates):
                    continue
                try:
                    await self.nodes.on_compute(
                        view.record.name, lambda c, r=request: c.SetImagePoolSize(r, timeout=deadlines.CONTROL)
                    )
                except (ServiceError, grpc.aio.AioRpcError) as exc:
                    log.warning(
                        "template_pool_not_released", node=view.record.name, image=request.image, error=str(exc)
                    )

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
