"""NodeVms: the VM records of this relay's node, kept current by an etcd watch, and how to reach each agent.

The relay is told a VM id only (by the gateway for a sandbox's exec and file calls, by compute for its own
guest control); where the guest's channel is comes from the VM's record, which only this node's compute writes.
"""

from __future__ import annotations

import asyncio

import aetcd
import structlog

from microvm.types.v1 import vm_pb2
from services.common import observability
from services.common.errors import FailedPrecondition, NotFound
from services.common.records import VMS, RecordCorrupt, Records
from services.common.tasks import cancel_and_wait
from services.relay.agent_channel import HYBRID_VSOCK, VIRTIO_SERIAL, AgentTarget

log = structlog.get_logger()
TRANSPORTS = {vm_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL: VIRTIO_SERIAL, vm_pb2.AGENT_TRANSPORT_HYBRID_VSOCK: HYBRID_VSOCK}


def target_of(vm: vm_pb2.VmRecord) -> AgentTarget:
    return AgentTarget(
        vm_id=vm.id,
        socket_path=vm.agent.socket_path,
        transport=TRANSPORTS.get(vm.agent.transport, VIRTIO_SERIAL),
        vsock_port=vm.agent.vsock_port or 1024,
        generation=vm.pid,
    )


class NodeVms:
    def __init__(self, etcd, node: str, on_removed=None) -> None:
        self.etcd = etcd
        self.records = Records(etcd)
        self.node = node
        self.vms: dict[str, vm_pb2.VmRecord] = {}
        # Called with the last record of a VM whose record was deleted (its channel can go).
        self._on_removed = on_removed
        self._task: asyncio.Task | None = None

    async def open(self) -> None:
        await self._reload()
        self._task = asyncio.create_task(self._watch_forever(), name="relay-vm-watch")

    async def _reload(self) -> int:
        result = await self.etcd.get_prefix(VMS.scope(self.node))
        vms = {}
        for kv in result:
            try:
                vm = VMS.decode(kv.value, kv.key)
            except RecordCorrupt as exc:
                log.error("vm_record_unreadable", key=kv.key.decode(errors="replace"), error=str(exc))
                continue
            vms[vm.id] = vm
        self.vms = vms
        return result.header.revision if result.header else 0

    async def _watch_forever(self) -> None:
        while True:
            try:
                revision = await self._reload()
                watch = await self.etcd.watch_prefix(VMS.scope(self.node), start_revision=revision + 1)
                async for event in watch:
                    parts = VMS.parts_of(event.kv.key)
                    if parts is None:
                        continue
                    if event.kind == aetcd.rtypes.EventKind.PUT:
                        try:
                            self.vms[parts[1]] = VMS.decode(event.kv.value, event.kv.key)
                        except RecordCorrupt as exc:
                            log.error("vm_record_unreadable", vm=parts[1], error=str(exc))
                    else:
                        removed = self.vms.pop(parts[1], None)
                        if removed is not None and self._on_removed is not None:
                            await self._on_removed(removed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay_vm_watch_failed", error=str(exc))
                await asyncio.sleep(0.5)

    def is_paused(self, vm_id: str) -> bool:
        """Whether the VM's record says it is paused (a pool VM waiting, a paused sandbox)."""
        vm = self.vms.get(vm_id)
        return vm is not None and vm.state == vm_pb2.VM_STATE_PAUSED

    async def get(self, vm_id: str) -> vm_pb2.VmRecord:
        """The VM's record; read from etcd when the watch has not delivered it yet (a VM just created)."""
        vm = self.vms.get(vm_id)
        if vm is None and vm_id and "/" not in vm_id:
            stored = await self.records.get(VMS, self.node, vm_id)
            vm = stored.message if stored else None
        if vm is None:
            raise NotFound(
                f"no VM {vm_id} on node {self.node}", reason="VM_NOT_FOUND", metadata={"node": self.node, "vm": vm_id}
            )
        return vm

    async def target(self, vm_id: str, running: bool = True) -> AgentTarget:
        """Where VM `vm_id`'s agent is; with `running`, FAILED_PRECONDITION unless its VM runs."""
        vm = await self.get(vm_id)
        observability.bind_to_call(sandbox=vm.id)  # on every later log line of this call
        if running and vm.state != vm_pb2.VM_STATE_RUNNING:
            raise FailedPrecondition(
                f"VM {vm_id} is {vm_pb2.VmState.Name(vm.state).removeprefix('VM_STATE_')}"
                + (f": {vm.failure_message}" if vm.failure_message else ""),
                reason="VM_NOT_RUNNING",
                metadata={"vm": vm_id},
            )
        return target_of(vm)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
