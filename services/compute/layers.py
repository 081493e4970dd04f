"""Template build layers on this node, and the builder VMs that make them.

A layer is a VM disk kept after a build step ran in it: for QEMU and Cloud Hypervisor a qcow2 file whose
backing file is its parent layer (or the base image's root filesystem), so a layer holds only what its step
changed; for the fake VMM a directory tree. Each is named by its step's key (hash of the parent's key, the
step's text and what it copies), so a rebuild reuses every layer up to the first changed step. A builder VM
boots cold on a fresh layer over its parent (never a template snapshot: the guest's page cache would not
match the disk under it), runs one step (the gateway drives it through the relay), and is committed: synced,
stopped, its disk moved under the layer's key. Publishing flattens the top layer into a raw root filesystem,
so a user template's image is booted, snapshotted and pooled exactly like a built-in one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import template_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.compute.disks import create_overlay, run_tool
from services.compute.lifecycle import VmLifecycle
from services.compute.process_exit import exited

if TYPE_CHECKING:
    from images.builder import BuiltImage

log = structlog.get_logger()
KEY = re.compile(r"^[0-9a-f]{16,64}$")


def check_key(key: str) -> None:
    if not KEY.match(key):
        raise InvalidArgument(f"layer key {key!r} is not a hex digest", reason="INVALID_LAYER_KEY")


async def unlocked(disk: Path, seconds: float = 120.0) -> None:
    """Waits until no process holds `disk`'s image lock. A killed VMM's leader can be a zombie while its other
    threads still tear down a large guest's memory with the disk open: the next builder, opening the disk as its
    backing file, would be refused ("Failed to get shared write lock")."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "info", str(disk), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await process.communicate()
        if process.returncode == 0 or b"lock" not in stderr:
            return
        await asyncio.sleep(0.1)
    log.warning("layer_still_locked", disk=str(disk))


async def virtual_size(image: Path) -> int:
    """The size a disk image presents to a guest."""
    process = await asyncio.create_subprocess_exec(
        "qemu-img",
        "info",
        "-U",
        "--output=json",
        str(image),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    try:
        return int(json.loads(stdout)["virtual-size"])
    except (ValueError, KeyError):
        return image.stat().st_size


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
    return path.stat().st_blocks * 512 if path.exists() else 0


class Layers:
    def __init__(self, lifecycle: VmLifecycle, root: Path) -> None:
        self.lifecycle, self.root = lifecycle, root
        self.tree = getattr(lifecycle.driver, "disk_format", "qcow2") == "tree"

    def path(self, key: str) -> Path:
        return self.root / (key if self.tree else f"{key}.qcow2")

    def usable(self, key: str, base: BuiltImage | None = None) -> bool:
        """The layer and every layer under it are there (a pruned parent breaks its children), and (given `base`)
        the bottom one stands on that root filesystem: the base image's current build, by path and by filesystem
        id (a build made again under the same recipe hash is another filesystem; a layer over the first would
        read as corrupt over the second)."""
        bottom: dict = {}
        while key:
            path = self.path(key)
            if not path.exists():
                return False
            try:
                bottom = json.loads(path.with_name(f"{key}.json").read_text())
            except (OSError, ValueError):
                return False
            key = bottom.get("parent", "")
        if base is None:
            return True
        return bottom.get("base") == str(base.rootfs) and bottom.get("base_id") == base.rootfs_id

    def find(self, keys, base_image: str = "") -> list[str]:
        base = self.lifecycle.images.require(base_image, self.lifecycle.node) if base_image else None
        found = [key for key in keys if KEY.match(key) and self.usable(key, base)]
        for key in found:
            self.touch(key)
        return found

    def touch(self, key: str) -> None:
        """Marks a layer used now (what the cache's least-recently-used order goes by)."""
        try:
            self.path(key).with_name(f"{key}.json").touch()
        except OSError:
            pass

    def prune(self, max_bytes: int, max_age_seconds: float) -> list[str]:
        """Drops layers unused for `max_age_seconds`, then least recently used ones while all take more than
        `max_bytes`; a dropped layer's descendants go with it (they stand on it). Never a layer a builder VM
        runs on now. Returns the keys dropped."""
        if not self.root.exists():
            return []
        facts: dict[str, tuple[float, str, int]] = {}
        for meta in self.root.glob("*.json"):
            key = meta.stem
            try:
                parent = json.loads(meta.read_text()).get("parent", "")
                facts[key] = (meta.stat().st_mtime, parent, _size(self.path(key)))
            except (OSError, ValueError):
                continue
        busy = set()
        for vm in self.lifecycle.ledger.vms.values():
            try:
                busy.add(json.loads((Path(vm.directory) / "layer-parent").read_text()).get("parent", ""))
            except (OSError, ValueError):
                continue
        children: dict[str, list[str]] = {}
        for key, (_, parent, _) in facts.items():
            children.setdefault(parent, []).append(key)

        def lineage(key: str) -> list[str]:
            found, pending = [], [key]
            while pending:
                current = pending.pop()
                found.append(current)
                pending.extend(children.get(current, []))
            return found

        def holds_busy(key: str) -> bool:
            return any(k in busy for k in lineage(key))

        now, dropped = time.time(), []
        total = sum(size for _, _, size in facts.values())
        for key in sorted(facts, key=lambda k: facts[k][0]):
            if key in dropped or holds_busy(key):
                continue
            if now - facts[key][0] <= max_age_seconds and total <= max_bytes:
                break
            for doomed in lineage(key):
                if doomed in dropped:
                    continue
                self.path(doomed).with_name(f"{doomed}.json").unlink(missing_ok=True)
                target = self.path(doomed)
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                total -= facts.get(doomed, (0, "", 0))[2]
                dropped.append(doomed)
        if dropped:
            log.info("layers_pruned", count=len(dropped), bytes_left=total)
        return dropped

    async def start_builder(
        self,
        vm_id: str,
        base_image: str,
        parent: str,
        vcpus: int,
        memory_mib: int,
        policy: network_types.NetworkPolicy | None,
        disk_mib: int = 0,
    ) -> VmRecord:
        lifecycle = self.lifecycle
        image = lifecycle.images.require(base_image, lifecycle.node)
        if parent:
            check_key(parent)
            if not self.usable(parent):
                raise NotFound(f"layer {parent} is not on node {lifecycle.node}", reason="LAYER_NOT_FOUND")
            self.touch(parent)
        lifecycle.validate(vm_id, base_image, vcpus, memory_mib, vm_id)
        vm = await lifecycle.admit(vm_id, base_image, vcpus, memory_mib, "builder", image, start_method="builder")

        async def launch(directory: Path) -> int:
            disk = lifecycle.driver.paths(directory)["disk"]
            if self.tree:
                source = self.path(parent) if parent else image.rootfs
                if source.is_dir():
                    await asyncio.to_thread(shutil.copytree, source, disk, symlinks=True)
            else:
                backing, kind = (self.path(parent), "qcow2") if parent else (image.rootfs, "raw")
                grow = disk_mib if disk_mib and (disk_mib << 20) > await virtual_size(backing) else 0
                await create_overlay(backing, kind, disk, grow)
            origin = {"parent": parent, "base": str(image.rootfs), "base_id": image.rootfs_id}
            (directory / "layer-parent").write_text(json.dumps(origin))
            return await lifecycle.driver.launch(vm, image, directory)

        vm = await lifecycle.boot(vm, launch, policy)
        if disk_mib and not self.tree:
            # Grown disks: the file system follows (online; a no-op when it already fills the disk).
            code = await lifecycle.guests.run(vm_id, ["resize2fs", "/dev/vda"], timeout=120)
            if code != 0:
                log.warning("builder_resize2fs_failed", vm=vm_id, exit_code=code)
        return vm

    async def commit(self, vm_id: str, key: str) -> int:
        """Syncs and stops the builder VM, keeps its disk as layer `key`, deletes the VM."""
        check_key(key)
        lifecycle = self.lifecycle
        vm = lifecycle.ledger.vms.get(vm_id)
        if vm is None or vm.start_method != "builder":
            raise NotFound(f"builder VM {vm_id} is not on node {lifecycle.node}", reason="VM_NOT_FOUND")
        directory = Path(vm.directory)
        origin = json.loads((directory / "layer-parent").read_text())
        pid = vm.pid
        vm = await lifecycle.stop(vm_id)
        await exited(pid)
        if not self.tree:
            await unlocked(lifecycle.driver.paths(directory)["disk"])
        try:
            disk = lifecycle.driver.paths(directory)["disk"]
            if not disk.exists():
                raise FailedPrecondition(f"builder VM {vm_id} has no disk to keep", reason="LAYER_LOST")
            self.root.mkdir(parents=True, exist_ok=True)
            target = self.path(key)
            if target.exists():  # the same step finished twice (a retried build): the first one stands
                return _size(target)
            staged = self.root / f".{key}.{vm_id}"
            await asyncio.to_thread(shutil.move, str(disk), str(staged))
            target.with_name(f"{key}.json").write_text(json.dumps({**origin, "vm": vm_id, "time": time.time()}))
            staged.rename(target)
            size = _size(target)
            log.info("layer_committed", layer=key, parent=origin["parent"], bytes=size)
            return size
        finally:
            await lifecycle.delete(vm_id)

    async def publish(self, name: str, base_image: str, layer: str, config: template_pb2.ImageConfig) -> int:
        """Image `name` from `layer` (empty: the base's root filesystem as it is); returns its disk bytes."""
        lifecycle = self.lifecycle
        base = lifecycle.images.require(base_image, lifecycle.node)
        if layer:
            check_key(layer)
            if not self.usable(layer):
                raise NotFound(f"layer {layer} is not on node {lifecycle.node}", reason="LAYER_NOT_FOUND")
        source = self.path(layer) if layer else base.rootfs
        work = await asyncio.to_thread(lifecycle.images.stage, name, base, config)
        rootfs = work / "rootfs.ext4"
        if self.tree:
            if source.is_dir():
                await asyncio.to_thread(shutil.copytree, source, rootfs, symlinks=True)
            else:
                rootfs.mkdir()
        elif layer:
            # -U: the builder VM that wrote the layer is gone, but its VMM may still be exiting with the image lock.
            await run_tool(
                "qemu-img", "convert", "-U", "-O", "raw", str(source), str(rootfs), reason="LAYER_WRITE_FAILED"
            )
        else:
            await run_tool(
                "cp", "--reflink=auto", "--sparse=always", str(source), str(rootfs), reason="LAYER_WRITE_FAILED"
            )
        image = await asyncio.to_thread(lifecycle.images.complete, name, work)
        rootfs = image.rootfs
        size = _size(rootfs)
        log.info("image_published", image=name, layer=layer, bytes=size)
        return size
