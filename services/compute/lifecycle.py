"""VmLifecycle: creating, booting, stopping, starting, pausing and deleting the VMs of this node.

Each VM has a directory under `<state_dir>/compute/vms/<vm-id>` (disk overlay, sockets, console log, pid file)
and a record in etcd. A create is admitted (its record holds capacity) before anything starts, and a failure at
any step removes whatever was made: nothing half-made survives. Warm starts (the pool, template snapshots) are
tried first through `warm`; a cold boot is the fallback.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import structlog
from opentelemetry import trace

from images.builder import BuiltImage
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import vm_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from services.common.settings import ComputeSettings
from services.compute.cpu_priority import can_raise_back, set_niceness
from services.compute.guests import GuestLink
from services.compute.image_start import start_service
from services.compute.images import NodeImages
from services.compute.ledger import VmLedger, check_names, state_name
from services.compute.network_link import NetworkLink
from services.compute.supervision import VmProcesses
from services.compute.vmm import VmmDriver

log = structlog.get_logger()
# Spans of a start's steps: bench/breakdown.py shows where a fork's restores spend their time.
TRACER = trace.get_tracer("microvm.compute")
TRANSPORTS = {
    "virtio-serial": vm_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL,
    "hybrid-vsock": vm_pb2.AGENT_TRANSPORT_HYBRID_VSOCK,
}
Launch = Callable[[Path], Awaitable[int]]


class VmLifecycle:
    def __init__(
        self,
        ledger: VmLedger,
        driver: VmmDriver,
        processes: VmProcesses,
        guests: GuestLink,
        network: NetworkLink | None,
        settings: ComputeSettings,
        root: Path,
        image_root: Path,
        ram_root: Path,
    ) -> None:
        self.ledger, self.driver, self.processes, self.guests = ledger, driver, processes, guests
        self.network, self.settings = network, settings
        self.root, self.image_root, self.ram_root = root, image_root, ram_root
        self.images = NodeImages(image_root, root.parent / "images")
        # Told of every VM that started (the node's metrics): (vm, start method, time.time() it began or None).
        self.on_started = lambda vm, method, since=None: None
        # Set by the node once the warm start exists (it builds on this class).
        self.warm = None

    @property
    def node(self) -> str:
        return self.ledger.node

    def templates(self) -> list[str]:
        return self.images.names()

    def template_disk_bytes(self) -> dict[str, int]:
        """Each template's root filesystem size: a VM's copy-on-write disk never grows past it."""
        sizes = {}
        for name in self.templates():
            try:
                image = self.images.load(name)
                sizes[name] = (
                    image.rootfs.stat().st_size
                    if image.rootfs.exists()
                    else int(image.manifest.get("rootfs_size_mib", 0)) << 20
                )
            except (OSError, ValueError):
                continue  # a build being replaced: the next publish has it
        return sizes

    def template_builds(self) -> dict[str, str]:
        builds = {}
        for name in self.templates():
            try:
                builds[name] = self.images.load(name).directory.name
            except (OSError, ValueError):
                continue
        return builds

    def validate(self, vm_id: str, template: str, vcpus: int, memory_mib: int, hostname: str) -> None:
        check_names(vm_id, hostname)
        if not 1 <= vcpus <= self.settings.max_vcpus_per_vm:
            raise InvalidArgument(
                f"vcpus must be between 1 and {self.settings.max_vcpus_per_vm}, got {vcpus}",
                reason="VCPUS_OUT_OF_RANGE",
            )
        if not 128 <= memory_mib <= self.settings.max_memory_mib_per_vm:
            raise InvalidArgument(
                f"memory_mib must be between 128 and {self.settings.max_memory_mib_per_vm}, got {memory_mib}",
                reason="MEMORY_OUT_OF_RANGE",
            )
        if template not in self.templates():
            raise NotFound(
                f"template {template!r} is not built on node {self.node} "
                f"(available: {', '.join(self.templates()) or 'none'})",
                reason="TEMPLATE_NOT_FOUND",
            )

    async def create(
        self,
        vm_id: str,
        template: str,
        vcpus: int,
        memory_mib: int,
        hostname: str,
        policy: network_types.NetworkPolicy | None = None,
    ) -> VmRecord:
        hostname = hostname or vm_id
        self.validate(vm_id, template, vcpus, memory_mib, hostname)
        if vm_id in self.ledger.vms:
            raise AlreadyExists(f"VM {vm_id} already exists on node {self.node}")
        if self.warm is not None:
            vm = await self.warm.start(vm_id, template, vcpus, memory_mib, hostname, policy)
            if vm is not None:
                return vm
        image = self.images.load(template)
        vm = await self.admit(vm_id, template, vcpus, memory_mib, hostname, image)
        vm = await self.boot(vm, lambda directory: self.driver.launch(vm, image, directory), policy)
        try:
            await start_service(self.guests, vm_id, self.images.config(template))
        except BaseException:
            await self.delete(vm_id)
            raise
        return vm

    async def admit(
        self,
        vm_id: str,
        template: str,
        vcpus: int,
        memory_mib: int,
        hostname: str,
        image: BuiltImage,
        *,
        boot_hostname: str = "",
        source_snapshot: str = "",
        ram_path: str | None = None,
        ram_shared: bool = True,
        start_method: str = "cold-boot",
        pooled: bool = False,
    ) -> VmRecord:
        """Reserves capacity for a new VM by recording it (CREATING) before anything starts."""
        async with self.ledger.admission:
            if not pooled:
                self.ledger.check_room(vm_id, vcpus, memory_mib)
            elif vm_id in self.ledger.vms:
                raise FailedPrecondition(f"VM {vm_id} already exists", reason="VM_EXISTS")
            directory = self.root / vm_id
            vm = VmRecord(
                id=vm_id,
                node=self.node,
                template=template,
                image_dir=str(image.directory),
                rootfs_id=image.rootfs_id,
                vcpus=vcpus,
                memory_mib=memory_mib,
                hostname=hostname,
                vmm=self.driver.name,
                accel=self.driver.accel,
                directory=str(directory),
                state=vm_pb2.VM_STATE_CREATING,
                agent=vm_pb2.AgentEndpoint(
                    transport=TRANSPORTS[self.driver.agent_transport],
                    socket_path=str(self.driver.paths(directory)["agent"]),
                ),
                boot_hostname=boot_hostname or hostname,
                source_snapshot=source_snapshot,
                # Cold boots keep RAM in a shared file, so their snapshots are a file copy.
                ram_path=str(self.ram_root / f"{vm_id}.ram") if ram_path is None else ram_path,
                ram_shared=ram_shared,
                start_method=start_method,
                pooled=pooled,
            )
            vm.create_time.GetCurrentTime()
            await self.ledger.save(vm)  # holds its capacity from here on
            return vm

    async def boot(self, vm: VmRecord, launch: Launch, policy: network_types.NetworkPolicy | None = None) -> VmRecord:
        """Attaches the VM to the node's network, runs `launch(directory) -> pid`, waits for the agent, gives the
        guest its network and (restored from a snapshot) its own identity; on any failure nothing is left."""
        directory = Path(vm.directory)
        async with self.ledger.lock(vm.id):
            try:
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
                if self.network is not None:
                    with TRACER.start_as_current_span("compute.network_attach"):
                        await self.network.attach(vm, policy)
                        await self.ledger.save(vm)
                with TRACER.start_as_current_span("compute.vmm_launch"):
                    vm.pid = await launch(directory)
                if vm.pooled and self.settings.pool_fill_niceness and can_raise_back():
                    set_niceness(vm.pid, self.settings.pool_fill_niceness)  # its restore and warm-up included
                await self.ledger.save(vm)
                self.processes.watch(vm)
                await self._until_ready(vm)
                vm.state = vm_pb2.VM_STATE_RUNNING
                await self.ledger.save(vm)
                log.info("vm_started", vm=vm.id, pid=vm.pid, template=vm.template, method=vm.start_method)
                self.on_started(vm, "pool-fill" if vm.pooled else vm.start_method)
                return vm
            except BaseException as exc:
                await self.processes.destroy(vm)
                await self.ledger.forget(vm)
                # A downstream status (the network service's RESOURCE_EXHAUSTED, say) passes through as it is.
                if isinstance(exc, ServiceError | asyncio.CancelledError | grpc.aio.AioRpcError):
                    raise
                raise Unavailable(f"VM {vm.id} failed to start: {exc}", reason="VM_START_FAILED") from exc

    async def _until_ready(self, vm: VmRecord) -> None:
        with TRACER.start_as_current_span("compute.wait_for_agent"):
            await self.guests.wait_for_agent(
                vm.id,
                self.settings.boot_timeout_seconds,
                alive=lambda: vm.state != vm_pb2.VM_STATE_FAILED and self.processes.alive(vm),
                describe=lambda: self.processes.console_tail(vm),
            )
        if vm.nic.tap_device:
            with TRACER.start_as_current_span("compute.configure_network"):
                await self.guests.configure_network(vm.id)
        if vm.start_method != "cold-boot" and not vm.pooled:
            # Restored: the guest has its source's host name and RNG state until it is given its own. Confirmed
            # behind the start, as a claim's is: its frames reach the guest before any later one (the caller's first
            # command runs renamed and reseeded), the guest has just answered, and one that never confirms is
            # marked FAILED by the relay. A fork's clones each waited out that round trip under load.
            await self.guests.set_identity(vm.id, vm.hostname, confirm_later=True)

    async def claim(
        self, pooled: VmRecord, vm_id: str, hostname: str, policy: network_types.NetworkPolicy | None = None
    ) -> VmRecord:
        """Turns a paused pool VM into `vm_id`: resumed, recorded under the new id, counted as used, given its
        identity. Its network attachment moves with it (same TAP and address, the caller's policy). The new record
        is written before the attachment moves and the old one removed after, so the network service never sees
        an attachment without a VM."""
        began = time.time()
        async with self.ledger.lock(pooled.id):
            async with self.ledger.admission:
                self.ledger.check_room(vm_id, pooled.vcpus, pooled.memory_mib)
                set_niceness(pooled.pid, 0)  # filled in the background; a sandbox's from now on
                await self.driver.resume(Path(pooled.directory))
                self.processes.unwatch(pooled.id)
                old_id = pooled.id
                pooled.id, pooled.hostname, pooled.pooled = vm_id, hostname, False
                pooled.state = vm_pb2.VM_STATE_RUNNING
                await self.ledger.save(pooled)
                self.ledger.vms.pop(old_id, None)
            try:
                self.processes.watch(pooled)
                # Side by side: the attachment moving is the network service's and etcd's work, the identity the
                # guest's; neither needs the other. The identity is confirmed after the create answered (its frames
                # reach the guest before any of the caller's): the guest's first round trip since it woke took a
                # warm create ~10 ms; a guest that does not confirm is marked FAILED by the relay.
                async with asyncio.TaskGroup() as both:
                    both.create_task(self._move_attachment(pooled, old_id, policy))
                    both.create_task(self.guests.set_identity(vm_id, hostname, confirm_later=True))
            except BaseException as exc:
                if isinstance(exc, BaseExceptionGroup):
                    exc = exc.exceptions[0]  # the first failure is the create's answer
                await self.ledger.forget_key(old_id)
                await self.processes.destroy(pooled)
                await self.ledger.forget(pooled)
                raise exc from None
        log.info("vm_started", vm=vm_id, pid=pooled.pid, template=pooled.template, method="warm-pool")
        self.on_started(pooled, "warm-pool", began)
        return pooled

    async def _move_attachment(self, vm: VmRecord, old_id: str, policy: network_types.NetworkPolicy | None) -> None:
        if self.network is not None and vm.nic.tap_device:
            await self.network.attach(vm, policy, from_vm_id=old_id)
            await self.ledger.save(vm)
        await self.ledger.forget_key(old_id)

    async def delete(self, vm_id: str) -> None:
        async with self.ledger.holding(vm_id) as vm:
            await self.processes.destroy(vm)
            await self.ledger.forget(vm)
        log.info("vm_deleted", vm=vm_id)

    async def stop(self, vm_id: str) -> VmRecord:
        """Stops the VM keeping its disk. A running guest first writes back what it holds in its page cache
        (within `stop_timeout_seconds`), so files written before the stop are on the kept disk."""
        async with self.ledger.holding(vm_id) as vm:
            if vm.state == vm_pb2.VM_STATE_RUNNING:
                try:
                    await self.guests.run(vm.id, ["sync"], self.settings.stop_timeout_seconds)
                except (ServiceError, grpc.aio.AioRpcError) as exc:
                    log.warning("vm_sync_before_stop_failed", vm=vm.id, error=str(exc))
            if vm.state in (vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_PAUSED):
                await self.processes.destroy(vm, keep_disk=True)
                vm.state, vm.pid = vm_pb2.VM_STATE_STOPPED, 0
                await self.ledger.save(vm)
            return vm

    async def start(self, vm_id: str) -> VmRecord:
        async with self.ledger.holding(vm_id) as vm:
            if vm.state == vm_pb2.VM_STATE_RUNNING:
                return vm
            if vm.state != vm_pb2.VM_STATE_STOPPED:
                raise FailedPrecondition(
                    f"VM {vm_id} is {state_name(vm)}; only a STOPPED VM can be started", reason="VM_NOT_STOPPED"
                )
            async with self.ledger.admission:
                self.ledger.vms.pop(vm_id)  # not counted against itself
                try:
                    self.ledger.check_room(vm_id, vm.vcpus, vm.memory_mib)
                finally:
                    self.ledger.vms[vm_id] = vm
                vm.state = vm_pb2.VM_STATE_CREATING
                await self.ledger.save(vm)
            try:
                try:
                    image = BuiltImage.at(Path(vm.image_dir))
                except FileNotFoundError as exc:
                    raise FailedPrecondition(f"cannot start VM {vm_id}: {exc}", reason="IMAGE_GONE") from None
                if vm.rootfs_id and image.rootfs_id != vm.rootfs_id:
                    raise FailedPrecondition(
                        f"cannot start VM {vm_id}: its image build {image.directory.name} was built again since the VM "
                        f"was made (root filesystem {image.rootfs_id}, its disk sits on {vm.rootfs_id}); its disk "
                        "would read as corrupt",
                        reason="IMAGE_REBUILT",
                    )
                vm.pid = await self.driver.launch(vm, image, Path(vm.directory))
                await self.ledger.save(vm)
                self.processes.watch(vm)
                await self._until_ready(vm)
            except BaseException:
                await self.processes.destroy(vm, keep_disk=True)
                vm.state, vm.pid = vm_pb2.VM_STATE_STOPPED, 0
                await self.ledger.save(vm)
                raise
            vm.state = vm_pb2.VM_STATE_RUNNING
            await self.ledger.save(vm)
            return vm

    async def set_paused(self, vm_id: str, paused: bool) -> VmRecord:
        wanted, needed = (
            (vm_pb2.VM_STATE_PAUSED, vm_pb2.VM_STATE_RUNNING)
            if paused
            else (vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_PAUSED)
        )
        async with self.ledger.holding(vm_id) as vm:
            if vm.state == wanted:
                return vm
            if vm.state != needed:
                name = vm_pb2.VmState.Name(needed).removeprefix("VM_STATE_")
                raise FailedPrecondition(f"VM {vm_id} is {state_name(vm)}, not {name}", reason=f"VM_NOT_{name}")
            await (self.driver.pause if paused else self.driver.resume)(Path(vm.directory))
            vm.state = wanted
            await self.ledger.save(vm)
        if not paused:
            # Its clock stood still while it was paused. Resumed all the same if the guest does not answer yet.
            try:
                await self.guests.sync_clock(vm_id)
            except (grpc.aio.AioRpcError, ServiceError) as exc:
                log.warning("guest_clock_not_synced_after_resume", vm=vm_id, error=str(exc))
        return vm
