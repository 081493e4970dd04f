"""NodeAdmin: ListNodes, GetNode, CordonNode, UncordonNode, DrainNode, and moving a sandbox between nodes.

A migration keeps the sandbox's id, files and running processes: the VM is paused and frozen on its node
(nothing changes after that instant), restored on another node under the same id (that node fetches the
snapshot's chunks), and the record is switched to the new node in one transaction; only then does the old VM
go. Until the switch the record names the old node, so the sandbox is never placed on two nodes at once, and a
failure before it resumes the old VM as it was.
"""

from __future__ import annotations

import grpc
import structlog

from microvm.admin.v1 import nodes_pb2
from microvm.compute.v1 import compute_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common import deadlines
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, ServiceError
from services.common.records import SANDBOXES
from services.gateway.nodes import ClusterNodes, NodeView
from services.gateway.placement import SandboxPlacement, choose
from services.gateway.records import PAUSED, RUNNING, SandboxRecord, SandboxStore, name_of
from services.gateway.sandbox_requests import parse_name
from services.gateway.snapshots import SnapshotOps

log = structlog.get_logger()
MIGRATING = sandbox_types.SANDBOX_RECORD_STATE_MIGRATING


def to_public(view: NodeView) -> nodes_pb2.Node:
    record, capacity = view.record, view.record.capacity
    return nodes_pb2.Node(
        name=f"nodes/{view.name}",
        state=nodes_pb2.NODE_STATE_READY if view.alive else nodes_pb2.NODE_STATE_UNAVAILABLE,
        cordoned=view.control.cordoned,
        draining=view.control.draining,
        reason=view.control.reason,
        vcpus_total=capacity.vcpus,
        vcpus_allocated=view.vcpus_allocated,
        memory_mib_total=capacity.memory_mib,
        memory_mib_allocated=view.memory_mib_allocated,
        disk_free_bytes=capacity.disk_free_bytes,
        sandbox_count=len(view.sandboxes),
        hypervisor=f"{record.vmm}/{record.accel}",
        labels=record.labels,
        templates=record.templates,
        update_time=record.update_time,
        template_snapshots=[f"{t.template}/{t.vcpus}c{t.memory_mib}m" for t in record.template_snapshots],
    )


class NodeAdmin:
    def __init__(
        self, store: SandboxStore, nodes: ClusterNodes, placement: SandboxPlacement, snapshots: SnapshotOps
    ) -> None:
        self.store, self.nodes, self.placement, self.snapshots = store, nodes, placement, snapshots

    async def _views(self) -> dict[str, NodeView]:
        return await self.nodes.views(await self.store.list(every_tenant=True))

    async def _view(self, name: str) -> NodeView:
        return await self.nodes.view(parse_name(name, "nodes"), await self.store.list(every_tenant=True))

    async def list(self) -> list[nodes_pb2.Node]:
        return [to_public(v) for v in sorted((await self._views()).values(), key=lambda v: v.name)]

    async def get(self, name: str) -> nodes_pb2.Node:
        return to_public(await self._view(name))

    async def cordon(self, name: str, reason: str) -> nodes_pb2.Node:
        view = await self._view(name)
        if len(reason) > 256:
            raise InvalidArgument("reason is at most 256 characters")
        view.control = await self.nodes.set_control(view.name, cordoned=True, reason=reason)
        log.info("node_cordoned", node=view.name, reason=reason)
        return to_public(view)

    async def uncordon(self, name: str) -> nodes_pb2.Node:
        view = await self._view(name)
        view.control = await self.nodes.set_control(view.name, cordoned=False, draining=False, reason="")
        log.info("node_uncordoned", node=view.name)
        return to_public(view)

    async def drain(self, name: str, migrate: bool, reason: str) -> nodes_pb2.DrainNodeResponse:
        view = await self._view(name)
        if len(reason) > 256:
            raise InvalidArgument("reason is at most 256 characters")
        if migrate:
            if not view.alive:
                raise FailedPrecondition(
                    f"node {view.name} is not answering: its sandboxes cannot be snapshotted", reason="NODE_UNAVAILABLE"
                )
            others = [v for v in (await self._views()).values() if v.name != view.name and v.schedulable]
            if view.sandboxes and not others:
                raise FailedPrecondition(
                    f"node {view.name} is the last schedulable node: its sandboxes have nowhere to go",
                    reason="NO_OTHER_NODE",
                )
        await self.nodes.set_control(view.name, cordoned=True, draining=True, reason=reason or "drained")
        migrated = []
        if migrate:
            for record in [s for s in view.sandboxes if s.state in (RUNNING, PAUSED)]:
                await self.migrate(record.id, view.name)
                migrated.append(f"sandboxes/{name_of(record)}")
            await self.nodes.set_control(view.name, draining=False)
        log.info("node_drained", node=view.name, migrate=migrate, migrated=len(migrated))
        return nodes_pb2.DrainNodeResponse(node=to_public(await self._view(name)), migrated=migrated)

    async def migrate(self, sandbox_id: str, source: str) -> str:
        """Moves one sandbox off `source`; returns the node it runs on now."""
        stored = await self.store.get_by_id(sandbox_id)
        record = stored.message
        was_paused = record.state == PAUSED
        record.state = MIGRATING
        if not await self.placement.records.transaction(
            compare=[self.placement.records.unchanged(SANDBOXES, stored.revision, sandbox_id)],
            success=[self.store.put_op(record)],
        ):
            raise Aborted(f"sandbox {sandbox_id} changed while its migration began; retry", reason="SANDBOX_CHANGED")
        snapshot = None
        target = ""
        try:
            snapshot = await self.snapshots.take(record, {"migration": sandbox_id}, tenant="", leave_paused=True)
            views = await self.nodes.views(await self.store.list(every_tenant=True))
            target = choose({n: v for n, v in views.items() if n != source}, record)
            restore = compute_pb2.RestoreVmRequest(
                vm_id=sandbox_id,
                snapshot_id=snapshot.id,
                hostname=name_of(record),
                network_policy=record.network_policy,
            )
            vm = (await self.nodes.on_compute(target, lambda c: c.RestoreVm(restore, timeout=deadlines.SNAPSHOT))).vm
            if was_paused:
                pause = compute_pb2.PauseVmRequest(vm_id=sandbox_id)
                await self.nodes.on_compute(target, lambda c: c.PauseVm(pause, timeout=deadlines.VM_CHANGE))
            current = await self.store.get_by_id(sandbox_id)
            current.message.state = PAUSED if was_paused else RUNNING
            current.message.hypervisor = f"{vm.vmm}/{vm.accel}"
            current.message.ip_address = vm.nic.guest_cidr.partition("/")[0]
            del current.message.exposed_ports[:]  # host ports were the old node's
            if not await self.placement.move(current.message, current.revision, target):
                raise Aborted(f"sandbox {sandbox_id} changed during its migration", reason="SANDBOX_CHANGED")
        except BaseException as exc:
            await self._abandon(record, source, target, was_paused, exc)
            raise
        finally:
            if snapshot is not None:
                await self._forget(snapshot)
        await self._delete_vm(source, sandbox_id)
        log.info("sandbox_migrated", sandbox=sandbox_id, source=source, target=target)
        return target

    async def _abandon(
        self, record: SandboxRecord, source: str, target: str, was_paused: bool, error: BaseException
    ) -> None:
        """A migration that failed before the switch: the new VM goes, the old one runs on as it was."""
        log.warning("sandbox_migration_failed", sandbox=record.id, source=source, target=target, error=str(error))
        if target:
            await self._delete_vm(target, record.id)
        try:
            if not was_paused:
                resume = compute_pb2.ResumeVmRequest(vm_id=record.id)
                await self.nodes.on_compute(source, lambda c: c.ResumeVm(resume, timeout=deadlines.VM_CHANGE))

            def back(current: SandboxRecord) -> None:
                if current.node == source:
                    current.state = PAUSED if was_paused else RUNNING

            await self.store.change(record, back, expect_states={MIGRATING})
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.error("sandbox_migration_rollback_failed", sandbox=record.id, error=str(exc))

    async def _delete_vm(self, node: str, vm_id: str) -> None:
        try:
            delete = compute_pb2.DeleteVmRequest(vm_id=vm_id)
            await self.nodes.on_compute(node, lambda c: c.DeleteVm(delete, timeout=deadlines.VM_CHANGE))
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("migration_vm_cleanup_failed", node=node, vm=vm_id, error=str(exc))

    async def _forget(self, snapshot) -> None:
        try:
            await self.snapshots.forget(snapshot)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("migration_snapshot_cleanup_failed", snapshot=snapshot.id, error=str(exc))
