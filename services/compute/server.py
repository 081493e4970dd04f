"""Wiring of the compute service: the node's parts put together, and the thin ComputeService servicer."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import grpc
import structlog

from images.builder import cache_root
from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from microvm.types.v1.vm_pb2 import VmRecord
from services.common import deadlines
from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.records import SNAPSHOTS, Records
from services.common.server import ServiceContext
from services.common.settings import ComputeSettings
from services.compute import hypervisor, snapshot_upkeep
from services.compute.archive_images import ArchiveImages
from services.compute.console import select
from services.compute.dependencies import vmm_dependency
from services.compute.guests import GuestLink
from services.compute.image_exchange import ImageExchange
from services.compute.images import is_user_image
from services.compute.layers import Layers
from services.compute.ledger import VmLedger
from services.compute.lifecycle import VmLifecycle
from services.compute.metrics import ComputeMetrics
from services.compute.network_link import NetworkLink
from services.compute.node_record import NodeReporter, parse_labels
from services.compute.reconcile import OrphanReaper, adopt
from services.compute.resource_sampler import ResourceSampler
from services.compute.snapshots import VmSnapshots
from services.compute.supervision import VmProcesses
from services.compute.template_exchange import TemplateExchange
from services.compute.templates import TemplateSnapshots
from services.compute.vmm import VmmDriver
from services.compute.warm_pool import WarmStart

log = structlog.get_logger()
# A local snapshot copy with no record is kept this long: its record is committed after the snapshot is taken.
SNAPSHOT_COPY_GRACE_SECONDS = 600.0


def make_driver(settings: ComputeSettings) -> tuple[VmmDriver, str]:
    """The VMM driver this node uses, and why."""
    if settings.vmm == "fake":
        from services.compute.fake_vmm import FakeVmmDriver

        log.warning("fake_vmm_in_use", detail="compute.vmm is fake: sandboxes are host processes, not isolated")
        return FakeVmmDriver(), "forced by compute.vmm=fake (tests only: no isolation)"
    choice = hypervisor.choose(settings.vmm, settings.accel, settings.qemu_binary, settings.cloud_hypervisor_binary)
    if choice.vmm == "cloud-hypervisor":
        from services.compute.cloud_hypervisor import CloudHypervisorDriver

        return (
            CloudHypervisorDriver(choice, settings.cloud_hypervisor_binary, settings.aslr_for(choice.accel)),
            choice.reason,
        )
    from services.compute.qemu import QemuDriver

    return (
        QemuDriver(choice, settings.qemu_binary, settings.tcg_tb_size_mib, settings.aslr_for(choice.accel)),
        choice.reason,
    )


class ComputeNode:
    """Everything compute runs on one node, each part with one responsibility."""

    def __init__(self, context: ServiceContext[ComputeSettings], driver: VmmDriver, hypervisor_reason: str) -> None:
        settings, common = context.settings, context.common
        self.context, self.node = context, common.node
        state_dir = Path(common.state_dir)
        root = state_dir / "compute"
        self.network = NetworkLink(context, self.node) if common.networking else None
        self.ledger = VmLedger(context.etcd, self.node, settings)
        self.processes = VmProcesses(
            self.ledger, driver, self.network, settings.console_log_max_bytes, settings.console_log_keep
        )
        image_root = Path(settings.image_cache_dir) if settings.image_cache_dir else cache_root()
        self.lifecycle = VmLifecycle(
            self.ledger,
            driver,
            self.processes,
            GuestLink(context, self.node),
            self.network,
            settings,
            root / "vms",
            image_root,
            settings.ram_root(state_dir),
        )
        self.snapshots = VmSnapshots(self.lifecycle, root / "snapshots")
        self.templates = TemplateSnapshots(self.lifecycle, self.snapshots, root / "templates")
        self.layers = Layers(self.lifecycle, root / "layers")
        self.archives = ArchiveImages(self.lifecycle)
        self.exchange = ImageExchange(self.lifecycle, self.snapshots, self.snapshot_store)
        self.warm = WarmStart(
            self.lifecycle, self.snapshots, self.templates, TemplateExchange(self.templates, self.snapshot_store)
        )
        self.lifecycle.warm = self.warm
        self.metrics = ComputeMetrics(context.metrics, self)
        self.usage = ResourceSampler(self.ledger, settings.usage_sample_seconds, self.lifecycle.guests)
        self.lifecycle.on_started = self.metrics.started
        self.warm.on_refilled = self.metrics.refilled
        self.reporter = NodeReporter(
            Records(context.etcd),
            self.lifecycle,
            self.templates,
            state_dir,
            parse_labels(common.node_labels),
            hypervisor_reason,
        )

    def snapshot_store(self) -> snapshot_pb2_grpc.SnapshotStoreServiceStub:
        """This node's snapshot store: artifacts stay on the node that made them."""
        instance = self.context.directory.newest("snapshot", self.node)
        return snapshot_pb2_grpc.SnapshotStoreServiceStub(self.context.channel(instance.address))

    async def restore(self, vm_id: str, snapshot_id: str, hostname: str, policy, share_memory: bool = False):
        store = self.snapshot_store()
        record = (
            await store.GetSnapshotRecord(
                snapshot_pb2.GetSnapshotRecordRequest(id=snapshot_id), timeout=deadlines.QUICK
            )
        ).record
        if record.image:  # a user template's sandbox: its image may have been built on another node
            await self.exchange.ensure(record.image)
        return await self.snapshots.restore(vm_id, record, hostname, store, policy, share_memory)

    async def prune_snapshot_copies(self, min_age_seconds: float = SNAPSHOT_COPY_GRACE_SECONDS) -> list[str]:
        """Every fork and snapshot leaves its frozen files on the node (RAM, disk): kept while a record or a VM
        needs them, then dropped."""
        live = {stored.message.id for stored in await self.ledger.records.list(SNAPSHOTS)}
        dropped = await snapshot_upkeep.prune(self.snapshots, live, min_age_seconds)
        if dropped:
            log.info("snapshot_copies_pruned", count=len(dropped))
        in_use = {Path(vm.image_dir) for vm in self.ledger.vms.values()}
        # In the loop, not a thread: a restore that just found a build (and refreshed its time) is never raced.
        self.snapshots.builds.prune(in_use, min_age_seconds)
        return dropped

    async def network_ready(self) -> None:
        if self.network is not None and not await self.network.wait_until_registered(60):
            log.warning("network_service_missing", node=self.node)

    async def start(self) -> None:
        snapshot_upkeep.reap_leftover_helpers(self.snapshots)
        await adopt(self.lifecycle, self.warm)
        await self.reporter.publish()
        self.warm.start_upkeep(self.network_ready)

    async def close(self) -> None:
        await self.warm.close()
        self.processes.close()


def shown(vm: VmRecord) -> VmRecord:
    """A VM as callers off this node see it: without the node's paths (directory, image, RAM file, agent socket),
    which mean nothing elsewhere; the relay of this node reads them from the record itself."""
    view = VmRecord()
    view.CopyFrom(vm)
    view.directory = view.image_dir = view.ram_path = ""
    view.agent.socket_path = ""
    return view


class ComputeServicer(compute_pb2_grpc.ComputeServiceServicer):
    def __init__(self, node: ComputeNode) -> None:
        self.node = node
        self.lifecycle, self.ledger = node.lifecycle, node.ledger

    def _owned(self, vm_id: str) -> str:
        """The id of a VM someone owns; pool and template-build VMs are NOT_FOUND to callers."""
        return self.ledger.visible(vm_id).id

    async def CreateVm(self, request, context):
        await self.node.exchange.ensure(request.template or "default")  # a template image built elsewhere
        vm = await self.lifecycle.create(
            request.vm_id,
            request.template or "default",
            request.vcpus or 1,
            request.memory_mib or 256,
            request.hostname,
            request.network_policy,
        )
        return compute_pb2.CreateVmResponse(vm=shown(vm))

    async def GetVmUsage(self, request, context):
        after = request.after.ToNanoseconds() / 1e9 if request.HasField("after") else 0.0
        found = []
        for vm_id in request.vm_ids:
            samples = self.node.usage.usage(vm_id, after, request.latest_only)
            if samples is not None:
                found.append(compute_pb2.VmUsage(vm_id=vm_id, samples=samples))
        return compute_pb2.GetVmUsageResponse(vms=found)

    async def GetVm(self, request, context):
        return compute_pb2.GetVmResponse(vm=shown(self.ledger.visible(request.vm_id)))

    async def ListVms(self, request, context):
        return compute_pb2.ListVmsResponse(vms=[shown(vm) for vm in self.ledger.owned()])

    async def StopVm(self, request, context):
        return compute_pb2.StopVmResponse(vm=shown(await self.lifecycle.stop(self._owned(request.vm_id))))

    async def StartVm(self, request, context):
        return compute_pb2.StartVmResponse(vm=shown(await self.lifecycle.start(self._owned(request.vm_id))))

    async def DeleteVm(self, request, context):
        await self.lifecycle.delete(self._owned(request.vm_id))
        return compute_pb2.DeleteVmResponse()

    async def PauseVm(self, request, context):
        return compute_pb2.PauseVmResponse(vm=shown(await self.lifecycle.set_paused(self._owned(request.vm_id), True)))

    async def ResumeVm(self, request, context):
        vm = await self.lifecycle.set_paused(self._owned(request.vm_id), False)
        return compute_pb2.ResumeVmResponse(vm=shown(vm))

    async def SnapshotVm(self, request, context):
        size = await self.node.snapshots.snapshot(
            request.vm_id,
            request.snapshot_id,
            self.node.snapshot_store(),
            request.leave_paused,
            request.share_memory,
            request.local_only,
        )
        return compute_pb2.SnapshotVmResponse(size_bytes=size)

    async def RestoreVm(self, request, context):
        if request.local_snapshot:
            vm = await self.node.snapshots.restore_here(
                request.vm_id, request.snapshot_id, request.hostname, request.network_policy, request.share_memory
            )
        else:
            vm = await self.node.restore(
                request.vm_id, request.snapshot_id, request.hostname, request.network_policy, request.share_memory
            )
        return compute_pb2.RestoreVmResponse(vm=shown(vm))

    async def FindLayers(self, request, context):
        return compute_pb2.FindLayersResponse(present=self.node.layers.find(request.keys, request.base_image))

    async def StartBuilderVm(self, request, context):
        vm = await self.node.layers.start_builder(
            request.vm_id,
            request.base_image,
            request.parent_layer,
            request.vcpus or 1,
            request.memory_mib or 512,
            request.network_policy,
            request.disk_mib,
        )
        return compute_pb2.StartBuilderVmResponse(vm=shown(vm))

    async def CommitBuilderVm(self, request, context):
        size = await self.node.layers.commit(request.vm_id, request.layer)
        return compute_pb2.CommitBuilderVmResponse(layer_bytes=size)

    async def PublishImage(self, request, context):
        size = await self.node.layers.publish(request.image, request.base_image, request.layer, request.config)
        warm = self.node.warm
        if warm.enabled:
            # Booted once, started, checked ready and snapshotted before the build may succeed: a template whose
            # server does not come up is not published.
            try:
                await warm.ensure_snapshot(request.image, *self.node.templates.size_of(request.image))
            except BaseException:
                await warm.forget_image(request.image)
                self.lifecycle.images.delete(request.image)
                raise
        try:  # offered to the other nodes: the template outlives this one
            await self.node.exchange.publish(request.image)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("image_not_offered", image=request.image, error=str(exc))
        await self.node.reporter.publish()
        self.node.templates.changed.set()  # its pool is filled now, not at the next tick
        return compute_pb2.PublishImageResponse(disk_bytes=size)

    async def SetImagePoolSize(self, request, context):
        if not is_user_image(request.image):
            raise InvalidArgument("only a user template's image has a pool size of its own", reason="NOT_A_USER_IMAGE")
        self.lifecycle.images.set_pool_size(request.image, request.pool_size)
        self.node.templates.changed.set()  # the pool is resized now, not at the next tick
        return compute_pb2.SetImagePoolSizeResponse()

    async def FetchImage(self, request, context):
        await self.node.exchange.ensure(request.image)
        await self.node.reporter.publish()
        self.node.templates.changed.set()
        return compute_pb2.FetchImageResponse()

    async def DeleteImage(self, request, context):
        await self.node.warm.forget_image(request.image)
        self.lifecycle.images.delete(request.image)
        await self.node.exchange.forget(request.image)
        await self.node.reporter.publish()
        return compute_pb2.DeleteImageResponse()

    async def ImportImage(self, request_iterator, context):
        config, size = await self.node.archives.import_image(request_iterator)
        await self.node.reporter.publish()
        return compute_pb2.ImportImageResponse(config=config, disk_bytes=size)

    async def ReadConsole(self, request, context):
        selection = select(request.tail_bytes, request.offset, request.length)
        console = self.node.processes.console(self.ledger.visible(request.vm_id))
        async with aclosing(console.stream(selection)) as chunks:
            async for offset, data in chunks:
                yield compute_pb2.ReadConsoleResponse(offset=offset, data=data)


async def wire(server, context: ServiceContext[ComputeSettings]) -> list[str]:
    driver, reason = make_driver(context.settings)
    node = ComputeNode(context, driver, reason)
    await node.start()

    async def report() -> None:
        try:
            await node.reporter.publish()
        except Unavailable:
            pass

    context.every(5.0, report, "node-record")
    context.every(context.settings.usage_sample_seconds, node.usage.sample_all, "usage-sampler")
    reaper = OrphanReaper(node.lifecycle, context.settings.orphan_grace_seconds)
    context.every(max(1.0, min(30.0, context.settings.orphan_grace_seconds / 4)), reaper.sweep, "orphan-vms")
    settings = context.settings

    async def prune_layers() -> None:
        max_age = settings.layer_cache_max_age_days * 86400
        await asyncio.to_thread(node.layers.prune, settings.layer_cache_max_bytes, max_age)

    context.every(600, prune_layers, "layer-cache")

    context.every(SNAPSHOT_COPY_GRACE_SECONDS / 2, node.prune_snapshot_copies, "snapshot-copies")
    context.registration_metadata.update(vmm=driver.name, accel=driver.accel, hypervisor_reason=reason)
    context.dependencies.append(vmm_dependency(driver))
    context.on_shutdown.append(node.close)
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(ComputeServicer(node), server)
    return [compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name]
