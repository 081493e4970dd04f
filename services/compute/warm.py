"""WarmStart: template snapshots and the warm pool, which turn Create into a restore instead of a boot.

Each template is cold-booted once (RAM in a shared file) and frozen into a *template snapshot* under
`<state_dir>/compute/templates/<template>/<image build>[-net][-<vcpus>c<memory>m]/`. Creates of that size
restore from it: the RAM file is mapped copy-on-write, so only device state is read and every such VM shares
the template's pages. The default size always has one, plus a pool of restored, paused VMs that makes Create
a resume; another size gets its template snapshot once it has been cold-booted `size_demand_threshold`
times (at most `extra_template_sizes` sizes). Cold boot stays the fallback, used automatically when the
template snapshot is missing, stale or fails to restore (it is then rebuilt).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import structlog

from images.builder import BuiltImage
from services.common.agent_channel import AgentChannel
from services.common.errors import ServiceError
from services.compute.records import VmRecord

log = structlog.get_logger()
CHECKED_FILES = ("devices.bin", "disk.qcow2", "config.json")


WARM_UP_COMMANDS = (["true"], ["echo", "warm"], ["sh", "-c", "echo warm"])


async def warm_up(vm: VmRecord) -> None:
    channel = AgentChannel(vm.agent_target)
    await channel.connect(timeout=5)
    try:
        for argv in WARM_UP_COMMANDS:
            await channel.run_to_exit(argv, timeout=30)
    finally:
        await channel.close()


class WarmStart:
    def __init__(self, fleet) -> None:
        self.fleet = fleet
        self.settings = fleet.settings
        self.root = fleet.root.parent / "templates"
        self.pool: dict[str, list[str]] = {}
        # Non-default sizes that get template snapshots, and cold boots counted for the others.
        self.sizes: list[tuple[str, int, int]] = []
        self.demand: dict[tuple[str, int, int], int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._claim_lock = asyncio.Lock()

    @property
    def default_size(self) -> tuple[int, int]:
        return self.settings.default_vcpus, self.settings.default_memory_mib

    def fits_pool(self, vcpus: int, memory_mib: int) -> bool:
        return (vcpus, memory_mib) == self.default_size

    def cold_booted(self, template: str, vcpus: int, memory_mib: int) -> None:
        """Counts demand for a size without a template snapshot; enough of it gets one built."""
        key = (template, vcpus, memory_mib)
        if (vcpus, memory_mib) == self.default_size or key in self.sizes:
            return
        self.demand[key] = self.demand.get(key, 0) + 1
        extra = [k for k in self.sizes if k[0] == template]
        if self.demand[key] >= self.settings.size_demand_threshold and len(extra) < self.settings.extra_template_sizes:
            self.sizes.append(key)
            self._wake.set()

    # --- template snapshots ------------------------------------------------------------------------
    def _directory(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> Path | None:
        try:
            image = BuiltImage.load(template, self.fleet.image_root)
        except FileNotFoundError:
            return None
        # With networking the frozen devices include a NIC: such a snapshot restores only where VMs have one.
        name = image.directory.name + ("-net" if self.fleet.network else "")
        if (vcpus or memory_mib) and (vcpus, memory_mib) != self.default_size:
            name += f"-{vcpus}c{memory_mib}m"
        return self.root / template / name

    def frozen(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> Path | None:
        """The template snapshot of that size (default: the default size) if it exists and its files are
        intact (RAM file: size only, it is large)."""
        directory = self._directory(template, vcpus, memory_mib)
        if directory is None or not (directory / ".complete").exists():
            return None
        try:
            expected = json.loads((directory / "verified.json").read_text())
            for filename in CHECKED_FILES:
                digest = hashlib.sha256((directory / filename).read_bytes()).hexdigest()
                if expected[filename]["sha256"] != digest:
                    raise ValueError(f"{filename} does not match its hash")
            if (directory / "ram").stat().st_size != expected["ram"]["size"]:
                raise ValueError("ram has the wrong size")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("template_snapshot_invalid", template=template, error=str(exc))
            self.invalidate(template, vcpus, memory_mib)
            return None
        return directory

    def invalidate(self, template: str, vcpus: int = 0, memory_mib: int = 0) -> None:
        directory = self._directory(template, vcpus, memory_mib)
        if directory is not None:
            (directory / ".complete").unlink(missing_ok=True)
        self._wake.set()

    async def _build(self, template: str, vcpus: int, memory_mib: int) -> None:
        directory = self._directory(template, vcpus, memory_mib)
        work = directory.with_name(f".{directory.name}.partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        vm_id = f"tmpl-{uuid.uuid4().hex[:10]}"
        image = BuiltImage.load(template, self.fleet.image_root)
        vm = await self.fleet._admit(vm_id, template, vcpus, memory_mib, vm_id, image, pooled=True)
        try:
            await self.fleet._start(vm, lambda d: self.fleet.driver.launch(vm, image, d))
            # Runs the exec path once so the guest's page cache in the snapshot already holds it.
            await warm_up(vm)
            await self.fleet._freeze(vm, image, work)
            hashes = {
                name: {"sha256": hashlib.sha256((work / name).read_bytes()).hexdigest()} for name in CHECKED_FILES
            }
            hashes["ram"] = {"size": (work / "ram").stat().st_size}
            (work / "verified.json").write_text(json.dumps(hashes))
            (work / ".complete").touch()
            shutil.rmtree(directory, ignore_errors=True)
            work.rename(directory)
            build = image.directory.name
            for stale in directory.parent.iterdir():  # older image builds of this template, any size
                if not stale.name.startswith((".", build)) and not self._in_use(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            log.info(
                "template_snapshot_built",
                template=template,
                vcpus=vcpus,
                memory_mib=memory_mib,
                directory=str(directory),
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if vm_id in self.fleet.vms:
                await self.fleet.delete(vm_id)

    def _in_use(self, directory: Path) -> bool:
        return any(vm.ram_path.startswith(str(directory)) for vm in self.fleet.vms.values())

    # --- the pool ----------------------------------------------------------------------------------
    def adopt(self, vm: VmRecord) -> None:
        self.pool.setdefault(vm.template, []).append(vm.id)

    async def _fill(self, template: str, frozen: Path) -> None:
        while len(self.pool.setdefault(template, [])) < self.settings.warm_pool_size:
            vm_id = f"pool-{uuid.uuid4().hex[:10]}"
            vm = await self.fleet._restore_from(frozen, vm_id, vm_id, start_method="warm-pool", pooled=True)
            # Under TCG each new VMM process translates guest code afresh: exercise the exec path now,
            # not on the user's first command.
            await warm_up(vm)
            await self.fleet.pause(vm.id)
            self.pool[template].append(vm.id)

    async def claim(self, template: str, vm_id: str, hostname: str, policy=None) -> VmRecord | None:
        """Hands out a pooled VM as `vm_id`: resumed and re-recorded under its new id; None if none is ready."""
        async with self._claim_lock:
            candidates = self.pool.get(template, [])
            while candidates:
                pooled = self.fleet.vms.get(candidates.pop(0))
                if pooled is None or pooled.state != "PAUSED":
                    continue
                try:
                    vm = await self.fleet.adopt_pooled(pooled, vm_id, hostname, policy)
                except ServiceError as exc:
                    log.warning("warm_pool_claim_failed", vm=pooled.id, error=exc.message)
                    continue
                self._wake.set()
                return vm
        self._wake.set()
        return None

    # --- upkeep ------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.settings.template_snapshots and self.fleet.driver.supports_template_snapshots

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._maintain(), name="warm-start")

    async def _maintain(self) -> None:
        # Every VM needs its TAP: building a template before the node's network service is up only fails.
        if self.fleet.network is not None and not await self.fleet.network.wait_until_registered(60):
            log.warning("network_service_missing", node=self.fleet.node)
        while True:
            self._wake.clear()
            for template in self.fleet.templates():
                try:
                    frozen = self.frozen(template)
                    if frozen is None:
                        await self._build(template, *self.default_size)
                        frozen = self.frozen(template)
                    if frozen is not None and self.settings.warm_pool_size:
                        await self._fill(template, frozen)
                    for _, vcpus, memory_mib in [k for k in self.sizes if k[0] == template]:
                        if self.frozen(template, vcpus, memory_mib) is None:
                            await self._build(template, vcpus, memory_mib)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("warm_start_upkeep_failed", template=template, error=str(exc))
                    await asyncio.sleep(5)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=30)
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, 3)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass
