"""TemplateSnapshots: each template booted once and frozen, so creates restore instead of booting.

A template snapshot lives under `<state_dir>/compute/templates/<template>/<image build>[-net][-<vcpus>c<memory>m]/`.
Creates of that size restore from it: with QEMU the RAM file is mapped copy-on-write, so only device state is
read and every such VM shares the template's pages. The default size always has one; another size gets one
once it has been cold-booted `size_demand_threshold` times (at most `extra_template_sizes` sizes per template).
A snapshot that is missing, stale or fails to restore is rebuilt; cold boot is the fallback meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import structlog

from microvm.types.v1 import node_pb2
from services.common import deadlines
from services.compute.disks import BASE_LINK
from services.compute.image_start import ready_check, start_service
from services.compute.images import is_user_image
from services.compute.lifecycle import VmLifecycle
from services.compute.snapshots import VmSnapshots

log = structlog.get_logger()
# Files of a template snapshot checked by size only (a RAM file is large; its pages are mapped, not read).
SIZE_ONLY = {"ram"}
WARM_UP_COMMANDS = (["true"], ["echo", "warm"], ["sh", "-c", "echo warm"])


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_facts(frozen: Path) -> dict[str, dict]:
    """Size and hash of each frozen file, which every use of the template snapshot checks. Not the link to the image
    (disks.py BASE_LINK): hashing it read the whole root filesystem, on every pool restore."""
    return {
        path.name: {"size": path.stat().st_size, "sha256": "" if path.name in SIZE_ONLY else _digest(path)}
        for path in frozen.iterdir()
        if path.is_file() and not path.is_symlink() and path.name not in ("verified.json", ".complete")
    }


class TemplateSnapshots:
    def __init__(self, lifecycle: VmLifecycle, snapshots: VmSnapshots, root: Path) -> None:
        self.lifecycle, self.snapshots, self.root = lifecycle, snapshots, root
        self.settings = lifecycle.settings
        # Non-default sizes that get template snapshots, and cold boots counted for the others.
        self.sizes: list[tuple[str, int, int]] = []
        self.demand: dict[tuple[str, int, int], int] = {}
        self.changed = asyncio.Event()

    @property
    def default_size(self) -> tuple[int, int]:
        return self.settings.default_vcpus, self.settings.default_memory_mib

    def size_of(self, template: str) -> tuple[int, int]:
        """The size a template is snapshotted and pooled at: a user template's own (its recipe's resources; its
        sandboxes get it unless they ask for another), else the node's default."""
        if is_user_image(template):
            config = self.lifecycle.images.config(template)
            return config.vcpus or self.default_size[0], config.memory_mib or self.default_size[1]
        return self.default_size

    def cold_booted(self, template: str, vcpus: int, memory_mib: int) -> None:
        """Counts demand for a size without a template snapshot; enough of it gets one built."""
        key = (template, vcpus, memory_mib)
        if (vcpus, memory_mib) == self.size_of(template) or key in self.sizes:
            return
        self.demand[key] = self.demand.get(key, 0) + 1
        extra = [k for k in self.sizes if k[0] == template]
        if self.demand[key] >= self.settings.size_demand_threshold and len(extra) < self.settings.extra_template_sizes:
            self.sizes.append(key)
            self.changed.set()

    def wanted(self, template: str) -> list[tuple[int, int]]:
        return [self.size_of(template)] + [(v, m) for t, v, m in self.sizes if t == template]

    def directory(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> Path | None:
        try:
            image = self.lifecycle.images.load(template)
        except FileNotFoundError:
            return None
        # With networking the frozen devices include a NIC: such a snapshot restores only where VMs have one.
        name = image.directory.name + ("-net" if self.lifecycle.network else "")
        if (vcpus or memory_mib) and (vcpus, memory_mib) != self.size_of(template):
            name += f"-{vcpus}c{memory_mib}m"
        return self.root / template / name

    def frozen(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> Path | None:
        """The template snapshot of that size (default: the default size) if it exists and its files are intact."""
        directory = self.directory(template, vcpus, memory_mib)
        if directory is None or not (directory / ".complete").exists():
            return None
        try:
            config = json.loads((directory / "config.json").read_text())
            machine, driver = config.get("machine", ""), self.lifecycle.driver
            if machine != driver.machine:
                raise ValueError(f"it was taken on VM machine {machine or 'of an earlier version'}")
            if config.get("boot_args") != driver.boot_args:
                raise ValueError("its guest booted with other kernel arguments")
            rootfs_id = self.lifecycle.images.load(template).rootfs_id
            if config.get("rootfs_id") != rootfs_id:
                # The image was built again under the same recipe hash: a restore would corrupt the guest's files.
                raise ValueError(
                    f"it was taken on root filesystem {config.get('rootfs_id')}, the image's is {rootfs_id}"
                )
            expected = json.loads((directory / "verified.json").read_text())
            for filename, facts in expected.items():
                if filename == BASE_LINK:  # the link to the image (a template of an earlier version listed it)
                    continue
                if (directory / filename).stat().st_size != facts["size"]:
                    raise ValueError(f"{filename} has the wrong size")
                if filename not in SIZE_ONLY and _digest(directory / filename) != facts["sha256"]:
                    raise ValueError(f"{filename} does not match its hash")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("template_snapshot_invalid", template=template, error=str(exc))
            self.invalidate(template, vcpus, memory_mib)
            return None
        return directory

    def held(self) -> list[node_pb2.TemplateSnapshotRef]:
        """The template snapshots this node has, for its node record (placement prefers such nodes)."""
        held = []
        for template in self.lifecycle.templates():
            for vcpus, memory_mib in self.wanted(template):
                directory = self.directory(template, vcpus, memory_mib)
                if directory is not None and (directory / ".complete").exists():
                    held.append(node_pb2.TemplateSnapshotRef(template=template, vcpus=vcpus, memory_mib=memory_mib))
        return held

    def invalidate(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> None:
        directory = self.directory(template, vcpus, memory_mib)
        if directory is not None:
            (directory / ".complete").unlink(missing_ok=True)
        self.changed.set()

    def forget(self, template: str) -> None:
        """Removes every template snapshot of a deleted image (VMs restored from one keep their mapped RAM)."""
        self.sizes = [key for key in self.sizes if key[0] != template]
        directory = self.root / template
        if directory.exists():
            for snapshot in directory.iterdir():
                if not self._in_use(snapshot):
                    shutil.rmtree(snapshot, ignore_errors=True)
        self.changed.set()

    async def warm_up(self, vm_id: str, template: str) -> None:
        """Runs the exec path in the guest, and the template's ready check (a template's own server: its request
        path), so what they touch is already in the page cache (and under TCG, already translated) when a user's
        first command or request comes. A check that fails here is only logged: the VM is no worse than cold."""
        for argv in WARM_UP_COMMANDS:
            await self.lifecycle.guests.run(vm_id, argv, timeout=deadlines.GUEST)
        # And the claim's own path (identity, clock, ping), which a warm create waits on.
        await self.lifecycle.guests.set_identity(vm_id, vm_id)
        check = ready_check(self.lifecycle.images.config(template))
        if check is not None:
            code = await self.lifecycle.guests.run(vm_id, check, timeout=deadlines.GUEST)
            if code != 0:
                log.warning("template_warm_up_check_failed", vm=vm_id, template=template, exit_code=code)

    async def build(self, template: str, vcpus: int, memory_mib: int) -> None:
        directory = self.directory(template, vcpus, memory_mib)
        work = directory.with_name(f".{directory.name}.partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        vm_id = f"tmpl-{uuid.uuid4().hex[:10]}"
        image = self.lifecycle.images.load(template)
        lifecycle = self.lifecycle
        vm = await lifecycle.admit(vm_id, template, vcpus, memory_mib, vm_id, image, pooled=True)
        try:
            await lifecycle.boot(vm, lambda d: lifecycle.driver.launch(vm, image, d))
            # A user template's server is up in the snapshot: its sandboxes' first command finds it.
            await start_service(lifecycle.guests, vm_id, lifecycle.images.config(template))
            await self.warm_up(vm_id, template)
            await self.snapshots.freeze(vm, image, work)
            self.install(work, template, vcpus, memory_mib, image.directory.name)
            log.info("template_snapshot_built", template=template, vcpus=vcpus, memory_mib=memory_mib)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if vm_id in lifecycle.ledger.vms:
                await lifecycle.delete(vm_id)

    def install(self, work: Path, template: str, vcpus: int, memory_mib: int, build: str) -> Path:
        """Makes the frozen files in `work` the template snapshot of that size (checked on every use from now on)
        and drops those of older image builds that no VM maps."""
        directory = self.directory(template, vcpus, memory_mib)
        (work / "verified.json").write_text(json.dumps(file_facts(work)))
        (work / ".complete").touch()
        shutil.rmtree(directory, ignore_errors=True)
        work.rename(directory)
        for stale in directory.parent.iterdir():  # older image builds of this template, any size
            if not stale.name.startswith((".", build)) and not self._in_use(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.changed.set()
        return directory

    def _in_use(self, directory: Path) -> bool:
        return any(vm.ram_path.startswith(str(directory)) for vm in self.lifecycle.ledger.vms.values())
