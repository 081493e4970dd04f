"""VmSnapshots: freezing VMs into this node's snapshot store, and VMs restored from snapshots.

A snapshot is frozen into `<state_dir>/compute/snapshots/<id>/` (device state, RAM or its file, the disk frozen
at the same instant, the VM's configuration), then each file is uploaded as an artifact. A restore on any node
materializes the snapshot there first: from the local copy when its files still match the record's hashes,
otherwise fetched from the node's snapshot store, which gets missing chunks from a node that holds them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import structlog
from opentelemetry import trace

from images.builder import BuiltImage
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import vm_pb2
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.compute.artifacts import ARTIFACT_FILES, available_memory_kib, download, hash_files, on_tmpfs, upload
from services.compute.build_exchange import BuildExchange, portable
from services.compute.disks import BASE_LINK, backing_name, point_base_link
from services.compute.ledger import VM_ID, check_names, state_name
from services.compute.lifecycle import VmLifecycle

log = structlog.get_logger()
TRACER = trace.get_tracer("microvm.compute")


class VmSnapshots:
    def __init__(self, lifecycle: VmLifecycle, snapshot_root: Path) -> None:
        self.lifecycle = lifecycle
        self.ledger, self.driver = lifecycle.ledger, lifecycle.driver
        # Snapshots materialized on this node: frozen disk + memory, shared by every VM restored from them.
        self.root = snapshot_root
        # Restores of each snapshot on this node since compute started: from the second on, its memory is shared.
        self.restores: dict[str, int] = {}
        self.unshareable: set[str] = set()  # tried once and failed: not again (restores would queue behind it)
        # The image builds snapshots leave with, and those fetched for snapshots that came from other nodes.
        self.builds = BuildExchange(self.materialize, snapshot_root.parent / "builds")

    async def snapshot(
        self,
        vm_id: str,
        snapshot_id: str,
        store,
        leave_paused: bool = False,
        share_memory: bool = False,
        local_only: bool = False,
    ) -> int:
        """Freezes memory, devices and disk of a VM into the snapshot store; returns the bytes stored. With
        `leave_paused` the VM stays paused afterwards (a migration: nothing may change after it). With `share_memory`
        (a fork's clones follow) a stream's RAM is made the shared form (`_share_memory`) while the files upload.
        With `local_only` nothing is uploaded: the copy on this node is the snapshot (`restore_here`)."""
        vm = self.ledger.visible(vm_id)
        if vm.state not in (vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_PAUSED):
            raise FailedPrecondition(
                f"VM {vm_id} is {state_name(vm)}; only a running or paused VM can be snapshotted",
                reason="VM_NOT_RUNNING",
            )
        if not VM_ID.fullmatch(snapshot_id):
            raise InvalidArgument(f"snapshot_id {snapshot_id!r} must match {VM_ID.pattern}")
        if leave_paused:
            await self.lifecycle.set_paused(vm_id, True)
        image = BuiltImage.at(Path(vm.image_dir))
        target = self.root / snapshot_id
        work = self.root / f".{snapshot_id}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with TRACER.start_as_current_span("compute.freeze"):
                hashes = await self.freeze(vm, image, work, hashed=not local_only)

            async def upload_all() -> int:
                if local_only:
                    return sum(entry["size"] for entry in hashes.values())
                with TRACER.start_as_current_span("compute.upload"):
                    return sum([await upload(store, snapshot_id, name, work / ARTIFACT_FILES[name]) for name in hashes])

            # Side by side: the store's writes and the helper's load take about as long, on different cores.
            try:
                async with asyncio.TaskGroup() as steps:
                    uploaded = steps.create_task(upload_all())
                    if share_memory:
                        config = json.loads((work / "config.json").read_text())
                        steps.create_task(self._make_shared(work, snapshot_id, config, image))
                    if not local_only and portable(work):  # it may be restored on a node with another build
                        steps.create_task(self.builds.offer(image, store))
            except ExceptionGroup as failed:  # an upload's (sharing never raises): as it is, not in a group
                raise failed.exceptions[0] from None
            total = uploaded.result()
            shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
            return total
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def freeze(self, vm: VmRecord, image: BuiltImage, out: Path, hashed: bool = True) -> dict[str, dict]:
        """The VM's state as files in `out` (with config.json and verified.json); returns their hashes. Without
        `hashed`, their sizes only: a copy that never leaves this node nor is checked against a record (a fork's
        kept on its node) needs no hash, which took 0.15-1 s for the 320 MiB RAM file of a cold-booted guest."""
        async with self.ledger.holding(vm.id) as vm:
            if vm.state not in (vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_PAUSED):
                raise FailedPrecondition(
                    f"VM {vm.id} became {state_name(vm)} while its snapshot began", reason="VM_NOT_RUNNING"
                )
            snapshot_format = await self.driver.snapshot(vm, out, image.rootfs)
        config = {
            "template": vm.template,
            "image_dir": vm.image_dir,
            # The build of the root filesystem the frozen page cache and disk overlay belong to: the VM's own (the
            # image may have been built again since the VM started, and it still reads the build it opened).
            "rootfs_id": vm.rootfs_id or image.rootfs_id,
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "boot_hostname": vm.boot_hostname or vm.hostname,
            "vmm": vm.vmm,
            "accel": vm.accel,
            "format": snapshot_format,
            "machine": self.driver.machine,
            "boot_args": self.driver.boot_args,
            "network": bool(vm.nic.tap_device),
        }
        (out / "config.json").write_text(json.dumps(config))
        if hashed:
            hashes = await asyncio.to_thread(hash_files, out, ARTIFACT_FILES)
        else:
            hashes = {n: {"size": (out / f).stat().st_size} for n, f in ARTIFACT_FILES.items() if (out / f).exists()}
        (out / "verified.json").write_text(json.dumps(hashes))
        return hashes

    async def materialize(self, record: SnapshotRecord, store) -> Path:
        """The snapshot's files on this node, fetched (verified) when they are not here yet."""
        target = self.root / record.id
        expected = {a.name: a.sha256 for a in record.artifacts}
        async with self.ledger.lock(f"snapshot:{record.id}"):
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
            work = self.root / f".{record.id}.fetch"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                for name in expected:
                    if name not in ARTIFACT_FILES:
                        raise FailedPrecondition(
                            f"snapshot {record.id} has an artifact {name!r} this node does not know",
                            reason="UNKNOWN_ARTIFACT",
                        )
                    await download(store, record.id, name, work / ARTIFACT_FILES[name])
                hashes = await asyncio.to_thread(hash_files, work, ARTIFACT_FILES)
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

    async def restore(
        self,
        vm_id: str,
        record: SnapshotRecord,
        hostname: str,
        store,
        policy: network_types.NetworkPolicy | None = None,
        share_memory: bool = False,
    ) -> VmRecord:
        """A new VM from a snapshot: its own disk overlay on the frozen disk, RAM loaded, then running.
        `share_memory`: more restores of it follow here (see `_share_memory`)."""
        hostname = hostname or vm_id
        check_names(vm_id, hostname)
        with TRACER.start_as_current_span("compute.materialize"):
            frozen = await self.materialize(record, store)
        return await self.restore_from(
            frozen,
            vm_id,
            hostname,
            source_snapshot=record.id,
            policy=policy,
            share_memory=share_memory,
            store=store,
        )

    async def restore_here(
        self,
        vm_id: str,
        snapshot_id: str,
        hostname: str,
        policy: network_types.NetworkPolicy | None = None,
        share_memory: bool = False,
    ) -> VmRecord:
        """A new VM from a snapshot this node froze and kept to itself (`snapshot(local_only=True)`)."""
        hostname = hostname or vm_id
        check_names(vm_id, hostname)
        if not VM_ID.fullmatch(snapshot_id) or not (self.root / snapshot_id / "verified.json").is_file():
            raise NotFound(
                f"snapshot {snapshot_id} is not on node {self.ledger.node}",
                reason="SNAPSHOT_NOT_HERE",
                metadata={"snapshot": f"snapshots/{snapshot_id}"},
            )
        return await self.restore_from(
            self.root / snapshot_id,
            vm_id,
            hostname,
            source_snapshot=snapshot_id,
            policy=policy,
            share_memory=share_memory,
        )

    async def restore_from(
        self,
        frozen: Path,
        vm_id: str,
        hostname: str,
        source_snapshot: str = "",
        start_method: str = "snapshot-restore",
        pooled: bool = False,
        policy: network_types.NetworkPolicy | None = None,
        share_memory: bool = False,
        store=None,
    ) -> VmRecord:
        """A VM from the frozen files in `frozen`; `store` (this node's snapshot store) can fetch the snapshot's image
        build when this node has another."""
        config = json.loads((frozen / "config.json").read_text())
        networked = self.lifecycle.network is not None
        if config.get("network", False) != networked:
            # The NIC is part of the frozen device state: it can only be restored where it exists too.
            raise FailedPrecondition(
                f"snapshot {frozen.name} was taken with networking {'on' if config.get('network') else 'off'}; "
                f"this node has it {'on' if networked else 'off'}",
                reason="NETWORKING_MISMATCH",
            )
        if config["accel"] != self.driver.accel or config["vmm"] != self.driver.name:
            raise FailedPrecondition(
                f"snapshot {frozen.name} was taken under {config['vmm']}/{config['accel']}; "
                f"this node runs {self.driver.name}/{self.driver.accel}",
                reason="HYPERVISOR_MISMATCH",
            )
        if config.get("machine", "") != self.driver.machine:
            raise FailedPrecondition(
                f"snapshot {frozen.name} was taken on VM machine {config.get('machine') or 'of an earlier version'}; "
                f"this node's VMs are {self.driver.machine} (its devices differ)",
                reason="MACHINE_MISMATCH",
            )
        image = await self.image_for(config, frozen, store)
        if source_snapshot:
            with TRACER.start_as_current_span("compute.share_memory"):
                await self._share_memory(frozen, source_snapshot, config, image, share_memory)
        shared_ram = config.get("format") == "shared-ram" or (frozen / "ram").is_file()
        vm = await self.lifecycle.admit(
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
        return await self.lifecycle.boot(
            vm, lambda directory: self.driver.restore(vm, image, directory, frozen), policy
        )

    async def _share_memory(
        self, frozen: Path, snapshot_id: str, config: dict, image: BuiltImage, more_follow: bool = False
    ) -> None:
        """From a snapshot's second restore on this node (a snapshot restored again), or its first when `more_follow`
        (a fork's clones), its RAM as a file that restores map copy-on-write instead of each loading the migration
        stream: made once, its pages are shared by every VM restored from it, and each restore loads only device
        state. A lone first restore (a migration) does not wait for it. A failure leaves the stream, which restores
        as before, and is not tried again for that snapshot."""
        self.restores[snapshot_id] = self.restores.get(snapshot_id, 0) + 1
        wanted = self.restores[snapshot_id] >= 2 or more_follow
        if not wanted or (frozen / "devices.bin").exists() or snapshot_id in self.unshareable:
            return
        async with self.ledger.lock(f"snapshot:{snapshot_id}"):
            if (frozen / "devices.bin").exists() or snapshot_id in self.unshareable:
                return
            await self._make_shared(frozen, snapshot_id, config, image)

    async def _make_shared(self, frozen: Path, snapshot_id: str, config: dict, image: BuiltImage) -> None:
        """The driver's shared form of the stream snapshot in `frozen` (see `_share_memory`); never raises."""
        helper = VmRecord(
            id=f"share-{snapshot_id}",
            template=config["template"],
            image_dir=str(image.directory),
            vcpus=config["vcpus"],
            memory_mib=config["memory_mib"],
            hostname=config["boot_hostname"],
            boot_hostname=config["boot_hostname"],
        )
        if config.get("network"):
            helper.nic.tap_device, helper.nic.mac_address = "mvmshare0", "02:00:00:00:00:01"
        helper.ram_path = self._loading_place(snapshot_id, config["memory_mib"])
        work = self.root / f".{snapshot_id}.share"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with TRACER.start_as_current_span("compute.make_shared"):
                if await self.driver.share_memory(frozen, helper, image, work):
                    log.info("snapshot_memory_shared", snapshot=snapshot_id)
        except Exception as exc:  # noqa: BLE001 - an optimization: the stream still restores
            self.unshareable.add(snapshot_id)
            log.warning("snapshot_memory_not_shared", snapshot=snapshot_id, error=str(exc))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _loading_place(self, snapshot_id: str, memory_mib: int) -> str:
        """Where the helper of `_share_memory` loads the RAM first: a file in the node's RAM directory when that is
        tmpfs and the guest's whole RAM fits easily in the host's available memory (the load touches every page,
        zeros too, so the file is briefly as large as the guest), else "" (straight into the snapshot, slower). A
        leftover of a crash ends in `.ram`: adoption removes it."""
        ram_root = self.lifecycle.ram_root
        if not on_tmpfs(ram_root) or memory_mib * 1024 > available_memory_kib() // 4:
            return ""
        ram_root.mkdir(parents=True, exist_ok=True)
        return str(ram_root / f"share-{snapshot_id}.ram")

    async def image_for(self, config: dict, frozen: Path, store=None) -> BuiltImage:
        """`image_of`; for a frozen disk that names its base only through its link (`portable`), any copy of the
        exact build also serves: one fetched before, or fetched now from the node that offered it. The link is
        pointed at the build chosen."""
        try:
            image = self.image_of(config, frozen.name)
        except FailedPrecondition as refused:
            expected = config.get("rootfs_id", "")
            if not (expected and portable(frozen)):
                raise
            image = self.builds.local(expected)
            if image is None and store is None:  # a snapshot kept on this node: its build was here or nowhere
                raise
            image = image or await self.builds.fetch(expected, store)
            if image is None:
                raise FailedPrecondition(
                    f"{refused.message}; no node offered the build it was taken on", reason=refused.reason
                ) from None
        if backing_name(frozen / "disk.qcow2") == BASE_LINK:
            point_base_link(frozen, image.rootfs)
        return image

    def image_of(self, config: dict, snapshot: str) -> BuiltImage:
        """The image build a snapshot was taken on: this node's copy of the same build (same recipe hash, so the
        same name under any node's image cache), or the path the source node had. The same recipe built twice (on
        two nodes, or rebuilt here) makes another filesystem, which the snapshot's guest would find corrupt: the
        root filesystem must be the one it was taken on (snapshots from before `rootfs_id` are not checked)."""
        build = Path(config["image_dir"])
        expected = config.get("rootfs_id")
        rebuilt = ""
        for directory in (self.lifecycle.images.root_of(config["template"]) / config["template"] / build.name, build):
            try:
                image = BuiltImage.at(directory)
            except FileNotFoundError:
                continue
            if expected is None or image.rootfs_id == expected:
                return image
            rebuilt = image.rootfs_id
        if rebuilt:
            raise FailedPrecondition(
                f"cannot restore snapshot {snapshot}: image build {build.name} of template {config['template']!r} "
                f"on node {self.ledger.node} is another build of the same recipe (root filesystem {rebuilt}, the "
                f"snapshot's is {expected}); its guest would find its files corrupt",
                reason="IMAGE_REBUILT",
            )
        raise FailedPrecondition(
            f"cannot restore snapshot {snapshot}: image build {build.name} of template "
            f"{config['template']!r} is not on node {self.ledger.node}",
            reason="IMAGE_GONE",
        )
