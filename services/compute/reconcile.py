"""adopt: what a starting compute service finds on its node, made to agree with its records.

VMM processes outlive the compute service. At start every record of this node is checked: a VM whose VMM still
runs and answers is adopted (watched again; a paused pool VM goes back into the pool); a dead, unresponsive or
half-created one is marked FAILED, releasing what it held; a pool or template-build VM nobody was given is
removed. VM directories and RAM files that no record names are deleted. Nothing orphaned, nothing forgotten.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import structlog

from microvm.types.v1 import template_pb2, vm_pb2
from services.common.errors import ServiceError
from services.common.records import SANDBOXES, TEMPLATE_BUILDS
from services.compute.lifecycle import VmLifecycle
from services.compute.supervision import kill
from services.compute.warm_pool import WarmStart

log = structlog.get_logger()


async def adopt(lifecycle: VmLifecycle, warm: WarmStart) -> dict[str, int]:
    ledger, driver, processes = lifecycle.ledger, lifecycle.driver, lifecycle.processes
    lifecycle.root.mkdir(parents=True, exist_ok=True)
    lifecycle.ram_root.mkdir(parents=True, exist_ok=True)
    counts = {"adopted": 0, "failed": 0, "orphans_removed": 0}
    for vm in await ledger.load():
        if vm.state in (vm_pb2.VM_STATE_STOPPED, vm_pb2.VM_STATE_FAILED):
            continue  # nothing runs
        directory = Path(vm.directory)
        alive = processes.alive(vm)
        status = None
        if alive:
            try:
                status = await driver.status(directory)
            except ServiceError:
                status = None
        if status and vm.state != vm_pb2.VM_STATE_CREATING:
            vm.state = vm_pb2.VM_STATE_RUNNING if status == "running" else vm_pb2.VM_STATE_PAUSED
            await ledger.save(vm)
            processes.watch(vm)
            counts["adopted"] += 1
            if vm.pooled and vm.state == vm_pb2.VM_STATE_PAUSED:
                warm.adopt(vm)
        elif vm.pooled:
            if alive:
                kill(vm.pid)
            await processes.destroy(vm)
            await ledger.forget(vm)
            counts["failed"] += 1
        else:
            # Dead, unresponsive, or caught half-created by our crash: it cannot be trusted.
            if alive:
                kill(vm.pid)
            await processes.mark_failed(
                vm,
                "the VM was not running when the compute service restarted"
                if not alive
                else "the VM was not ready when the compute service restarted",
            )
            counts["failed"] += 1
    known_directories = {Path(vm.directory) for vm in ledger.vms.values()}
    for directory in lifecycle.root.iterdir():
        if directory not in known_directories:
            try:
                pid = int(driver.paths(directory)["pid"].read_text())
                if driver.owns_process(pid, directory):
                    kill(pid)
            except (OSError, ValueError):
                pass
            shutil.rmtree(directory, ignore_errors=True)
            counts["orphans_removed"] += 1
    known_ram = {vm.ram_path for vm in ledger.vms.values()}
    for ram in lifecycle.ram_root.glob("*.ram"):
        if str(ram) not in known_ram:
            ram.unlink(missing_ok=True)
    log.info("vms_adopted", **counts)
    return counts


def builder_of(vm_id: str) -> str:
    """The build a builder VM (`bld-<build id>-<step>`) works for; empty for any other VM."""
    parts = vm_id.split("-")
    return parts[1] if len(parts) == 3 and parts[0] == "bld" else ""


class OrphanReaper:
    """Deletes VMs whose sandbox no longer names this node (a builder VM: whose build no longer runs): deleted
    while the node was away (the gateway could not reach it), or left behind by a migration that switched the
    sandbox to another node and could not remove the old VM. A VM counts as an orphan only after `grace` seconds
    without a sandbox record naming this node, so a VM being created or migrated here (its record still names
    its source) is never touched."""

    def __init__(self, lifecycle: VmLifecycle, grace: float) -> None:
        self.lifecycle, self.grace = lifecycle, grace
        self.records = lifecycle.ledger.records
        self._since: dict[str, float] = {}

    async def sweep(self) -> list[str]:
        if self.grace <= 0:
            return []
        sandboxes = {s.message.id: s.message.node for s in await self.records.list(SANDBOXES)}
        now, reaped = time.monotonic(), []
        owned = {vm.id for vm in self.lifecycle.ledger.owned()}
        building = {
            stored.message.id
            for stored in await self.records.list(TEMPLATE_BUILDS)
            if stored.message.state
            in (template_pb2.TEMPLATE_BUILD_STATE_BUILDING, template_pb2.TEMPLATE_BUILD_STATE_QUEUED)
        }
        for vm_id in owned:
            if sandboxes.get(vm_id) == self.lifecycle.node or builder_of(vm_id) in building:
                self._since.pop(vm_id, None)
                continue
            first_seen = self._since.setdefault(vm_id, now)
            if now - first_seen >= self.grace:
                log.warning("orphan_vm_deleted", vm=vm_id, sandbox_node=sandboxes.get(vm_id, ""))
                await self.lifecycle.delete(vm_id)
                self._since.pop(vm_id, None)
                reaped.append(vm_id)
        for vm_id in set(self._since) - owned:
            self._since.pop(vm_id)
        return reaped
