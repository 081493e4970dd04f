"""VmFleet: the VMs of this compute node, their lifecycle, and their records in etcd.

Each VM has a directory under `<state_dir>/compute/vms/<vm-id>` (disk overlay, sockets, console log,
pid file) and a record in etcd. The VMM processes are detached from the compute service, so a restarted
compute re-adopts the VMs that still run (pid + QMP answer) and marks dead ones FAILED, releasing what they
held: nothing orphaned, nothing forgotten.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import grpc
import structlog

from images.builder import BuiltImage, available_templates, cache_root
from microvm.snapshot.v1 import snapshot_pb2
from services.common.agent_channel import AgentChannel
from services.common.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.settings import ComputeSettings
from services.compute.network_link import NetworkLink, configure_guest
from services.compute.records import VMS_PREFIX, VmRecord
from services.compute.vmm import VmmDriver

log = structlog.get_logger()
VM_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOSTNAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
# Artifact name in the snapshot store -> file in a materialized snapshot.
ARTIFACT_FILES = {
    "memory": "memory.bin",
    "devices": "devices.bin",
    "ram": "ram",
    "disk": "disk.qcow2",
    "vmm-state": "vmm-state.tar",
    "config": "config.json",
}
UPLOAD_CHUNK = 1 << 20


def _hash_files(directory: Path, files: dict[str, str]) -> dict[str, dict]:
    result = {}
    for name, filename in files.items():
        if not (directory / filename).exists():
            continue
        digest = hashlib.sha256()
        with open(directory / filename, "rb") as f:
            while block := f.read(UPLOAD_CHUNK * 4):
                digest.update(block)
        result[name] = {"sha256": digest.hexdigest(), "size": (directory / filename).stat().st_size}
    return result


async def _upload(store, snapshot_id: str, name: str, path: Path) -> int:
    async def requests():
        yield snapshot_pb2.PutArtifactRequest(header=snapshot_pb2.PutArtifactHeader(snapshot_id=snapshot_id, name=name))
        with open(path, "rb") as f:
            while data := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
                yield snapshot_pb2.PutArtifactRequest(data=data)

    reply = await store.PutArtifact(requests(), timeout=600)
    return reply.artifact.size_bytes


async def _download(store, snapshot_id: str, name: str, path: Path) -> None:
    with open(path, "wb") as f:
        async for chunk in store.GetArtifact(
            snapshot_pb2.GetArtifactRequest(snapshot_id=snapshot_id, name=name), timeout=600
        ):
            await asyncio.to_thread(f.write, chunk.data)


class VmFleet:
    def __init__(
        self,
        settings: ComputeSettings,
        state_dir: Path,
        etcd,
        node_id: str,
        driver: VmmDriver,
        network: NetworkLink | None = None,
    ) -> None:
        self.settings = settings
        # None when the installation runs without networking: VMs then have no NIC.
        self.network = network
        self.etcd = etcd
        self.node = node_id
        self.driver = driver
        self.root = state_dir / "compute" / "vms"
        # Snapshots materialized on this node: frozen disk + memory, shared by every VM restored from them.
        self.snapshot_root = state_dir / "compute" / "snapshots"
        self.image_root = Path(settings.image_cache_dir) if settings.image_cache_dir else cache_root()
        self.ram_root = settings.ram_root(state_dir)
        self.vms: dict[str, VmRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._deleting: set[str] = set()
        self._admission = asyncio.Lock()
        from services.compute.warm import WarmStart

        self.warm = WarmStart(self)

    # --- records ---------------------------------------------------------------------------------
    async def _save(self, vm: VmRecord) -> None:
        self.vms[vm.id] = vm
        await self.etcd.put(vm.key.encode(), vm.encode())

    async def _forget(self, vm: VmRecord) -> None:
        self.vms.pop(vm.id, None)
        await self.etcd.delete(vm.key.encode())

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def get(self, vm_id: str) -> VmRecord:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} does not exist on node {self.node}", reason="VM_NOT_FOUND")
        return vm

    def capacity(self) -> tuple[int, int]:
        """(vcpus, memory MiB) held by VMs that are not stopped or failed."""
        held = [vm for vm in self.vms.values() if vm.holds_resources]
        return sum(vm.vcpus for vm in held), sum(vm.memory_mib for vm in held)

    def templates(self) -> list[str]:
        return available_templates(self.image_root)

    # --- start-up: re-adopt what survived us ---------------------------------------------------------
    async def adopt(self) -> dict[str, int]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ram_root.mkdir(parents=True, exist_ok=True)
        counts = {"adopted": 0, "failed": 0, "orphans_removed": 0}
        result = await self.etcd.get_prefix(f"{VMS_PREFIX}{self.node}/".encode())
        for kv in result:
            vm = VmRecord.decode(kv.value)
            self.vms[vm.id] = vm
            if vm.state in ("STOPPED", "FAILED"):
                continue  # nothing runs; pool VMs (which hold no capacity) are checked like the others
            directory = Path(vm.directory)
            alive = vm.pid and self.driver.owns_process(vm.pid, directory)
            status = None
            if alive:
                try:
                    status = await self.driver.status(directory)
                except ServiceError:
                    status = None
            if status and vm.state != "CREATING":
                vm.state = "RUNNING" if status == "running" else "PAUSED"
                await self._save(vm)
                self._watch(vm)
                counts["adopted"] += 1
                if vm.pooled and vm.state == "PAUSED":
                    self.warm.adopt(vm)
            elif vm.pooled:
                # A pool or template-building VM nobody was given: just remove it.
                if alive:
                    self._kill(vm.pid)
                await self._destroy(vm)
                await self._forget(vm)
                counts["failed"] += 1
            else:
                # Dead, unresponsive, or caught half-created by our crash: it cannot be trusted.
                if alive:
                    self._kill(vm.pid)
                await self._mark_failed(
                    vm,
                    "the VM was not running when the compute service restarted"
                    if not alive
                    else "the VM was not ready when the compute service restarted",
                )
                counts["failed"] += 1
        known_directories = {Path(vm.directory) for vm in self.vms.values()}
        for directory in self.root.iterdir() if self.root.exists() else []:
            if directory not in known_directories:
                pid_file = directory / "vmm.pid"
                try:
                    pid = int(pid_file.read_text())
                    if self.driver.owns_process(pid, directory):
                        self._kill(pid)
                except (OSError, ValueError):
                    pass
                shutil.rmtree(directory, ignore_errors=True)
                counts["orphans_removed"] += 1
        known_ram = {vm.ram_path for vm in self.vms.values()}
        for ram in self.ram_root.glob("*.ram"):
            if str(ram) not in known_ram:
                ram.unlink(missing_ok=True)
        log.info("vms_adopted", **counts)
        return counts

    # --- lifecycle -----------------------------------------------------------------------------------
    def _validate(self, vm_id: str, template: str, vcpus: int, memory_mib: int, hostname: str) -> None:
        if not VM_ID.match(vm_id):
            raise InvalidArgument(f"vm_id {vm_id!r} must match {VM_ID.pattern}")
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
        if not HOSTNAME.match(hostname):
            raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")
        if template not in self.templates():
            raise NotFound(
                f"template {template!r} is not built on node {self.node} "
                f"(available: {', '.join(self.templates()) or 'none'})",
                reason="TEMPLATE_NOT_FOUND",
            )

    async def create(
        self, vm_id: str, template: str, vcpus: int, memory_mib: int, hostname: str, policy=None
    ) -> VmRecord:
        hostname = hostname or vm_id
        self._validate(vm_id, template, vcpus, memory_mib, hostname)
        if vm_id in self.vms:
            raise AlreadyExists(f"VM {vm_id} already exists on node {self.node}")
        if self.warm.enabled:
            if self.warm.fits_pool(vcpus, memory_mib):
                vm = await self.warm.claim(template, vm_id, hostname, policy)
                if vm is not None:
                    return vm
            frozen = self.warm.frozen(template, vcpus, memory_mib)
            if frozen is not None:
                try:
                    return await self._restore_from(
                        frozen, vm_id, hostname, start_method="template-snapshot", policy=policy
                    )
                except ServiceError as exc:
                    # A template snapshot that does not restore is not trusted again: boot cold, rebuild it.
                    log.warning("template_snapshot_restore_failed", template=template, error=exc.message)
                    self.warm.invalidate(template, vcpus, memory_mib)
            self.warm.cold_booted(template, vcpus, memory_mib)
        image = BuiltImage.load(template, self.image_root)
        vm = await self._admit(vm_id, template, vcpus, memory_mib, hostname, image)
        return await self._start(vm, lambda directory: self.driver.launch(vm, image, directory), policy)

    async def _admit(
        self,
        vm_id: str,
        template: str,
        vcpus: int,
        memory_mib: int,
        hostname: str,
        image: BuiltImage,
        boot_hostname: str = "",
        source_snapshot: str = "",
        ram_path: str | None = None,
        ram_shared: bool = True,
        start_method: str = "cold-boot",
        pooled: bool = False,
    ) -> VmRecord:
        """Reserves capacity for a new VM by recording it (CREATING) before anything starts."""
        async with self._admission:
            if vm_id in self.vms:
                raise AlreadyExists(f"VM {vm_id} already exists on node {self.node}")
            used_vcpus, used_memory = self.capacity()
            if (
                used_vcpus + vcpus > self.settings.vcpus_total
                or used_memory + memory_mib > self.settings.memory_mib_total
            ):
                raise ResourceExhausted(
                    f"node {self.node} has {self.settings.vcpus_total - used_vcpus} vCPUs and "
                    f"{self.settings.memory_mib_total - used_memory} MiB free; asked for {vcpus} and {memory_mib}",
                    reason="NODE_CAPACITY",
                )
            directory = self.root / vm_id
            vm = VmRecord(
                id=vm_id,
                node=self.node,
                template=template,
                image_dir=str(image.directory),
                vcpus=vcpus,
                memory_mib=memory_mib,
                hostname=hostname,
                vmm=self.driver.name,
                accel=self.driver.accel,
                directory=str(directory),
                agent_socket=str(self.driver.paths(directory)["agent"]),
                agent_transport=self.driver.agent_transport,
                boot_hostname=boot_hostname or hostname,
                source_snapshot=source_snapshot,
                # Cold boots keep RAM in a shared file, so their snapshots are a file copy.
                ram_path=str(self.ram_root / f"{vm_id}.ram") if ram_path is None else ram_path,
                ram_shared=ram_shared,
                start_method=start_method,
                pooled=pooled,
            )
            await self._save(vm)  # holds its capacity from here on
            return vm

    async def _start(self, vm: VmRecord, launch, policy=None) -> VmRecord:
        """Attaches the VM to the node's network, runs `launch(directory) -> pid`, waits for the agent and
        configures the guest's network; on any failure nothing is left behind."""
        directory = Path(vm.directory)
        async with self._lock(vm.id):
            try:
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
                if self.network is not None:
                    await self.network.attach(vm, policy)
                    await self._save(vm)
                vm.pid = await launch(directory)
                await self._save(vm)
                self._watch(vm)
                await self._wait_for_agent(vm)
                if vm.tap_device:
                    await configure_guest(vm)
                vm.state = "RUNNING"
                await self._save(vm)
                log.info("vm_started", vm=vm.id, pid=vm.pid, template=vm.template, snapshot=vm.source_snapshot)
                return vm
            except BaseException as exc:
                await self._destroy(vm)
                await self._forget(vm)
                # A downstream status (the network service's RESOURCE_EXHAUSTED, say) passes through as it is.
                if isinstance(exc, (ServiceError, asyncio.CancelledError, grpc.aio.AioRpcError)):
                    raise
                raise Unavailable(f"VM {vm.id} failed to start: {exc}", reason="VM_START_FAILED") from exc

    # --- snapshots ---------------------------------------------------------------------------------------
    async def snapshot(self, vm_id: str, snapshot_id: str, store) -> int:
        """Freezes memory, devices and disk of a VM into the snapshot store; returns the bytes stored."""
        vm = self.get(vm_id)
        if vm.state not in ("RUNNING", "PAUSED"):
            raise FailedPrecondition(
                f"VM {vm_id} is {vm.state}; only a running or paused VM can be snapshotted", reason="VM_NOT_RUNNING"
            )
        if not VM_ID.match(snapshot_id):
            raise InvalidArgument(f"snapshot_id {snapshot_id!r} must match {VM_ID.pattern}")
        image = BuiltImage.at(Path(vm.image_dir))
        target = self.snapshot_root / snapshot_id
        work = self.snapshot_root / f".{snapshot_id}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            hashes = await self._freeze(vm, image, work)
            total = 0
            for name in hashes:
                total += await _upload(store, snapshot_id, name, work / ARTIFACT_FILES[name])
            shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
            return total
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _freeze(self, vm: VmRecord, image: BuiltImage, out: Path) -> dict[str, dict]:
        async with self._lock(vm.id):
            snapshot_format = await self.driver.snapshot(vm, out, image.rootfs)
        config = {
            "template": vm.template,
            "image_dir": vm.image_dir,
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "boot_hostname": vm.boot_hostname or vm.hostname,
            "vmm": vm.vmm,
            "accel": vm.accel,
            "format": snapshot_format,
            "network": bool(vm.tap_device),
        }
        (out / "config.json").write_text(json.dumps(config))
        hashes = await asyncio.to_thread(_hash_files, out, ARTIFACT_FILES)
        (out / "verified.json").write_text(json.dumps(hashes))
        return hashes

    async def _materialize(self, record, store) -> Path:
        """The snapshot's files on this node, fetched (verified chunk by chunk) when not here yet."""
        target = self.snapshot_root / record.id
        expected = {a.name: a.sha256 for a in record.artifacts}
        async with self._lock(f"snapshot:{record.id}"):
            try:
                known = json.loads((target / "verified.json").read_text())
                if all(
                    known.get(name, {}).get("sha256") == sha
                    and (target / ARTIFACT_FILES[name]).stat().st_size == known[name]["size"]
                    for name, sha in expected.items()
                ):
                    return target
            except (OSError, ValueError, KeyError):
                pass
            work = self.snapshot_root / f".{record.id}.fetch"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                for name in expected:
                    await _download(store, record.id, name, work / ARTIFACT_FILES[name])
                hashes = await asyncio.to_thread(_hash_files, work, ARTIFACT_FILES)
                for name, sha in expected.items():
                    if hashes[name]["sha256"] != sha:
                        raise DataLoss(
                            f"artifact {name} of snapshot {record.id} arrived corrupt", reason="ARTIFACT_CORRUPT"
                        )
                (work / "verified.json").write_text(json.dumps(hashes))
                shutil.rmtree(target, ignore_errors=True)
                work.rename(target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return target

    async def restore(self, vm_id: str, record, hostname: str, store, policy=None) -> VmRecord:
        """A new VM from a snapshot: its own disk overlay on the frozen disk, RAM loaded, then running."""
        hostname = hostname or vm_id
        if not VM_ID.match(vm_id):
            raise InvalidArgument(f"vm_id {vm_id!r} must match {VM_ID.pattern}")
        if not HOSTNAME.match(hostname):
            raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")
        frozen = await self._materialize(record, store)
        return await self._restore_from(
            frozen, vm_id, hostname, source_snapshot=record.id, start_method="snapshot-restore", policy=policy
        )

    async def _restore_from(
        self,
        frozen: Path,
        vm_id: str,
        hostname: str,
        source_snapshot: str = "",
        start_method: str = "snapshot-restore",
        pooled: bool = False,
        policy=None,
    ) -> VmRecord:
        config = json.loads((frozen / "config.json").read_text())
        if config.get("network", False) != (self.network is not None):
            # The NIC is part of the frozen device state: it can only be restored where it exists too.
            raise FailedPrecondition(
                f"snapshot {frozen.name} was taken with networking "
                f"{'on' if config.get('network') else 'off'}; this node has it "
                f"{'on' if self.network else 'off'}",
                reason="NETWORKING_MISMATCH",
            )
        if config["accel"] != self.driver.accel or config["vmm"] != self.driver.name:
            raise FailedPrecondition(
                f"snapshot {frozen.name} was taken under {config['vmm']}/{config['accel']}; "
                f"this node runs {self.driver.name}/{self.driver.accel}",
                reason="HYPERVISOR_MISMATCH",
            )
        try:
            image = BuiltImage.at(Path(config["image_dir"]))
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"cannot restore snapshot {frozen.name}: {exc}", reason="IMAGE_GONE") from None
        shared_ram = config.get("format") == "shared-ram"
        vm = await self._admit(
            vm_id,
            config["template"],
            config["vcpus"],
            config["memory_mib"],
            hostname,
            image,
            boot_hostname=config["boot_hostname"],
            source_snapshot=source_snapshot,
            ram_path=str(frozen / "ram") if shared_ram else "",
            ram_shared=False,
            start_method=start_method,
            pooled=pooled,
        )
        return await self._start(vm, lambda directory: self.driver.restore(vm, image, directory, frozen), policy)

    def prune_snapshot_cache(self, live_snapshots: set[str]) -> None:
        """Drops local snapshot copies that no record and no VM needs any more."""
        in_use = {vm.source_snapshot for vm in self.vms.values()} | live_snapshots
        for directory in self.snapshot_root.glob("*") if self.snapshot_root.exists() else []:
            if not directory.name.startswith(".") and directory.name not in in_use:
                shutil.rmtree(directory, ignore_errors=True)

    def visible(self) -> list[VmRecord]:
        """VMs that belong to someone: not the warm pool's or a template build's."""
        return [vm for vm in self.vms.values() if not vm.pooled]

    async def _wait_for_agent(self, vm: VmRecord) -> None:
        deadline = time.monotonic() + self.settings.boot_timeout_seconds
        channel = AgentChannel(vm.agent_target)
        await self._connect_agent(channel, vm, deadline)
        try:
            while True:
                if vm.state == "FAILED" or not self.driver.owns_process(vm.pid, Path(vm.directory)):
                    raise FailedPrecondition(
                        f"VM {vm.id} died while booting: {self.console_tail(vm)}", reason="VM_BOOT_FAILED"
                    )
                try:
                    await channel.wait_until_answering(timeout=1.0)
                    return
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"the agent of VM {vm.id} did not answer within "
                        f"{self.settings.boot_timeout_seconds:.0f}s: {self.console_tail(vm)}",
                        reason="VM_BOOT_TIMEOUT",
                    )
        finally:
            await channel.close()

    async def _connect_agent(self, channel: AgentChannel, vm: VmRecord, deadline: float) -> None:
        # A virtio-serial socket exists once the VMM runs; a hybrid-vsock CONNECT is refused until the
        # guest's agent listens, so keep trying until the boot deadline.
        while True:
            try:
                await channel.connect(timeout=5)
                return
            except Unavailable:
                if time.monotonic() > deadline or not self.driver.owns_process(vm.pid, Path(vm.directory)):
                    raise
                await asyncio.sleep(0.05)

    def console_tail(self, vm: VmRecord, lines: int = 5) -> str:
        try:
            text = (Path(vm.directory) / "console.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no console output"
        return " | ".join(text[-lines:]) or "no console output"

    async def adopt_pooled(self, pooled: VmRecord, vm_id: str, hostname: str, policy=None) -> VmRecord:
        """Turns a paused pool VM into `vm_id`: resumed, recorded under the new id, counted as used.

        Its network attachment moves with it (same TAP and address, the caller's policy). The new record is
        written before the attachment moves and the old one removed after, so the network service never
        sees an attachment without a VM."""
        async with self._lock(pooled.id):
            async with self._admission:
                if vm_id in self.vms:
                    raise AlreadyExists(f"VM {vm_id} already exists on node {self.node}")
                used_vcpus, used_memory = self.capacity()
                if (
                    used_vcpus + pooled.vcpus > self.settings.vcpus_total
                    or used_memory + pooled.memory_mib > self.settings.memory_mib_total
                ):
                    raise ResourceExhausted(f"node {self.node} has no room for VM {vm_id}", reason="NODE_CAPACITY")
                await self.driver.resume(Path(pooled.directory))
                old_watcher = self._watchers.pop(pooled.id, None)
                if old_watcher:
                    old_watcher.cancel()
                old_id, old_key = pooled.id, pooled.key
                pooled.id, pooled.hostname, pooled.pooled, pooled.state = vm_id, hostname, False, "RUNNING"
                await self._save(pooled)
                self.vms.pop(old_id, None)
                try:
                    if self.network is not None and pooled.tap_device:
                        await self.network.attach(pooled, policy, from_vm_id=old_id)
                        await self._save(pooled)
                except BaseException:
                    await self.etcd.delete(old_key.encode())
                    await self._destroy(pooled)
                    await self._forget(pooled)
                    raise
                await self.etcd.delete(old_key.encode())
                self._watch(pooled)
        log.info("vm_started", vm=vm_id, pid=pooled.pid, template=pooled.template, method="warm-pool")
        return pooled

    async def delete(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with self._lock(vm_id):
            await self._destroy(vm)
            await self._forget(vm)
        self._locks.pop(vm_id, None)
        log.info("vm_deleted", vm=vm_id)

    async def stop(self, vm_id: str) -> VmRecord:
        """Stops the VM keeping its disk. A running guest first writes back what it holds in its page cache
        (within `stop_timeout_seconds`), so files written before the stop are on the kept disk."""
        vm = self.get(vm_id)
        async with self._lock(vm_id):
            if vm.state == "RUNNING":
                await self._sync_guest(vm)
            if vm.state in ("RUNNING", "PAUSED"):
                await self._destroy(vm, keep_disk=True)
                vm.state, vm.pid = "STOPPED", 0
                await self._save(vm)
            return vm

    async def start(self, vm_id: str) -> VmRecord:
        vm = self.get(vm_id)
        async with self._lock(vm_id):
            if vm.state == "RUNNING":
                return vm
            if vm.state != "STOPPED":
                raise FailedPrecondition(
                    f"VM {vm_id} is {vm.state}; only a STOPPED VM can be started", reason="VM_NOT_STOPPED"
                )
            async with self._admission:
                used_vcpus, used_memory = self.capacity()
                if (
                    used_vcpus + vm.vcpus > self.settings.vcpus_total
                    or used_memory + vm.memory_mib > self.settings.memory_mib_total
                ):
                    raise ResourceExhausted(f"node {self.node} has no room to start VM {vm_id}", reason="NODE_CAPACITY")
                vm.state = "CREATING"
                await self._save(vm)
            try:
                try:
                    image = BuiltImage.at(Path(vm.image_dir))
                except FileNotFoundError as exc:
                    raise FailedPrecondition(f"cannot start VM {vm_id}: {exc}", reason="IMAGE_GONE") from None
                vm.pid = await self.driver.launch(vm, image, Path(vm.directory))
                await self._save(vm)
                self._watch(vm)
                await self._wait_for_agent(vm)
                if vm.tap_device:
                    await configure_guest(vm)
            except BaseException:
                await self._destroy(vm, keep_disk=True)
                vm.state, vm.pid = "STOPPED", 0
                await self._save(vm)
                raise
            vm.state = "RUNNING"
            await self._save(vm)
            return vm

    async def _sync_guest(self, vm: VmRecord) -> None:
        """Runs `sync` in the guest: its writes reach the virtual disk, hence the disk file (which the VMM
        has written to the host's page cache by then, so they survive the VMM being killed)."""
        channel = AgentChannel(vm.agent_target)
        try:
            await channel.connect(timeout=5)
            await channel.run_to_exit(["sync"], timeout=self.settings.stop_timeout_seconds)
        except (TimeoutError, ServiceError, OSError) as exc:
            log.warning("vm_sync_before_stop_failed", vm=vm.id, error=str(exc))
        finally:
            await channel.close()

    async def pause(self, vm_id: str) -> VmRecord:
        return await self._set_paused(vm_id, True)

    async def resume(self, vm_id: str) -> VmRecord:
        return await self._set_paused(vm_id, False)

    async def _set_paused(self, vm_id: str, paused: bool) -> VmRecord:
        vm = self.get(vm_id)
        wanted, needed = ("PAUSED", "RUNNING") if paused else ("RUNNING", "PAUSED")
        async with self._lock(vm_id):
            if vm.state == wanted:
                return vm
            if vm.state != needed:
                raise FailedPrecondition(f"VM {vm_id} is {vm.state}, not {needed}", reason=f"VM_NOT_{needed}")
            await (self.driver.pause if paused else self.driver.resume)(Path(vm.directory))
            vm.state = wanted
            await self._save(vm)
            return vm

    # --- process supervision ----------------------------------------------------------------------------
    def _watch(self, vm: VmRecord) -> None:
        """Notices the VMM process exiting (pidfd works for processes that are not our children)."""
        old = self._watchers.pop(vm.id, None)
        if old:
            old.cancel()
        self._watchers[vm.id] = asyncio.create_task(self._watch_process(vm.id, vm.pid), name=f"watch-{vm.id}")

    async def _watch_process(self, vm_id: str, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        vm = self.vms.get(vm_id)
        if vm is None or vm.pid != pid or vm_id in self._deleting or vm.state in ("STOPPED", "FAILED"):
            return
        await self._mark_failed(vm, f"the VMM process exited unexpectedly: {self.console_tail(vm, 3)}")

    async def _mark_failed(self, vm: VmRecord, message: str) -> None:
        log.warning("vm_failed", vm=vm.id, message=message)
        await self._destroy(vm)
        vm.state, vm.pid, vm.failure_message = "FAILED", 0, message
        await self._save(vm)

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _destroy(self, vm: VmRecord, keep_disk: bool = False) -> None:
        """Stops the VMM process and frees the VM's files (all of them unless `keep_disk`)."""
        self._deleting.add(vm.id)
        try:
            watcher = self._watchers.pop(vm.id, None)
            if watcher and watcher is not asyncio.current_task():
                watcher.cancel()
            directory = Path(vm.directory)
            if not vm.pid:  # interrupted between starting the VMM and recording its pid
                try:
                    vm.pid = int(self.driver.paths(directory)["pid"].read_text())
                except (OSError, ValueError):
                    pass
            if vm.pid and self.driver.owns_process(vm.pid, directory):
                self._kill(vm.pid)
                for _ in range(100):
                    if not self.driver.owns_process(vm.pid, directory):
                        break
                    await asyncio.sleep(0.02)
            if vm.ram_shared and vm.ram_path:
                Path(vm.ram_path).unlink(missing_ok=True)  # its own RAM file, never a snapshot's
            if keep_disk:
                for name in ("agent", "qmp", "pid"):
                    self.driver.paths(directory)[name].unlink(missing_ok=True)
            else:
                await asyncio.to_thread(shutil.rmtree, directory, True)
                if self.network is not None:
                    await self.network.detach(vm.id)
        finally:
            self._deleting.discard(vm.id)

    async def close(self) -> None:
        """Stops supervising; the VMs keep running for the next compute instance to adopt."""
        await self.warm.close()
        for task in self._watchers.values():
            task.cancel()
        self._watchers.clear()
