"""VmLedger: the VMs of this node and what they hold, in memory for speed and in etcd for everyone else.

`/microvm/vms/<node>/<vm-id>` -> VmRecord; this node's compute service is the only writer. A VM holds capacity
(vCPUs, memory) while CREATING, RUNNING or PAUSED, unless it is a pool or template-build VM. Admission (the
capacity check and the record that holds it) happens under one lock, so concurrent creates never oversubscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

from microvm.types.v1 import vm_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.common.records import VMS, Records
from services.common.settings import ComputeSettings

VM_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOSTNAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
HOLDING = (vm_pb2.VM_STATE_CREATING, vm_pb2.VM_STATE_RUNNING, vm_pb2.VM_STATE_PAUSED)


def holds_resources(vm: VmRecord) -> bool:
    return vm.state in HOLDING and not vm.pooled


def state_name(vm: VmRecord) -> str:
    return vm_pb2.VmState.Name(vm.state).removeprefix("VM_STATE_")


def check_names(vm_id: str, hostname: str) -> None:
    if not VM_ID.fullmatch(vm_id):
        raise InvalidArgument(f"vm_id {vm_id!r} must match {VM_ID.pattern}")
    if not HOSTNAME.fullmatch(hostname):
        raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")


class VmLedger:
    def __init__(self, etcd, node: str, settings: ComputeSettings) -> None:
        self.records = Records(etcd)
        self.node = node
        self.settings = settings
        self.vms: dict[str, VmRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Held while a capacity check and the record that takes the capacity are made.
        self.admission = asyncio.Lock()

    async def load(self) -> list[VmRecord]:
        """This node's records as etcd has them (legacy JSON ones rewritten first)."""
        await self.records.migrate(VMS, self.node)
        self.vms = {s.message.id: s.message for s in await self.records.list(VMS, self.node)}
        return list(self.vms.values())

    async def save(self, vm: VmRecord) -> None:
        vm.update_time.GetCurrentTime()
        self.vms[vm.id] = vm
        await self.records.put(VMS, vm, self.node, vm.id)

    async def forget(self, vm: VmRecord) -> None:
        self.vms.pop(vm.id, None)
        self._locks.pop(vm.id, None)
        await self.records.delete(VMS, self.node, vm.id)

    async def forget_key(self, vm_id: str) -> None:
        """Removes the record under `vm_id` only (a pool VM handed out lives on under its new id)."""
        await self.records.delete(VMS, self.node, vm_id)

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def holding(self, vm_id: str) -> AsyncIterator[VmRecord]:
        """The VM under its lock, read after the lock is held: a change that waited behind a delete finds the VM
        gone (NOT_FOUND), never acts on a record read before."""
        async with self.lock(vm_id):
            yield self.get(vm_id)

    def get(self, vm_id: str) -> VmRecord:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} does not exist on node {self.node}", reason="VM_NOT_FOUND")
        return vm

    def visible(self, vm_id: str) -> VmRecord:
        """A VM that belongs to someone; pool and template-build VMs are the node's own business."""
        vm = self.get(vm_id)
        if vm.pooled:
            raise NotFound(f"VM {vm_id} does not exist on node {self.node}", reason="VM_NOT_FOUND")
        return vm

    def owned(self) -> list[VmRecord]:
        return [vm for vm in self.vms.values() if not vm.pooled]

    def used(self) -> tuple[int, int]:
        """(vCPUs, memory MiB) held by VMs."""
        held = [vm for vm in self.vms.values() if holds_resources(vm)]
        return sum(vm.vcpus for vm in held), sum(vm.memory_mib for vm in held)

    def check_room(self, vm_id: str, vcpus: int, memory_mib: int) -> None:
        """Call with `admission` held."""
        if vm_id in self.vms:
            raise AlreadyExists(f"VM {vm_id} already exists on node {self.node}")
        used_vcpus, used_memory = self.used()
        if used_vcpus + vcpus > self.settings.vcpus_total or used_memory + memory_mib > self.settings.memory_mib_total:
            raise ResourceExhausted(
                f"node {self.node} has {self.settings.vcpus_total - used_vcpus} vCPUs and "
                f"{self.settings.memory_mib_total - used_memory} MiB free; asked for {vcpus} and {memory_mib}",
                reason="NODE_CAPACITY",
            )
