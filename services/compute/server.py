"""Wiring and handlers of the compute service (ComputeService)."""

from __future__ import annotations

from pathlib import Path

import grpc
import structlog

from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.common.errors import NotFound, ServiceError
from services.common.server import ServiceContext
from services.common.settings import ComputeSettings
from services.compute import hypervisor
from services.compute.cloud_hypervisor import CloudHypervisorDriver
from services.compute.fleet import VmFleet
from services.compute.network_link import NetworkLink
from services.compute.qemu import QemuDriver

log = structlog.get_logger()


class ComputeServicer(compute_pb2_grpc.ComputeServiceServicer):
    def __init__(self, fleet: VmFleet, context: ServiceContext) -> None:
        self.fleet = fleet
        self.context = context

    def _visible(self, vm_id: str) -> str:
        """Pool and template-build VMs are the node's own business: callers see NOT_FOUND."""
        vm = self.fleet.vms.get(vm_id)
        if vm is not None and vm.pooled:
            raise NotFound(f"VM {vm_id} does not exist on node {self.fleet.node}", reason="VM_NOT_FOUND")
        return vm_id

    def _snapshot_store(self) -> snapshot_pb2_grpc.SnapshotStoreServiceStub:
        return snapshot_pb2_grpc.SnapshotStoreServiceStub(
            self.context.channel(self.context.directory.newest("snapshot").address)
        )

    async def CreateVm(self, request, context):
        vm = await self.fleet.create(
            request.vm_id,
            request.template or "default",
            request.vcpus or 1,
            request.memory_mib or 256,
            request.hostname,
            request.network_policy,
        )
        return compute_pb2.CreateVmResponse(vm=vm.to_proto())

    async def GetVm(self, request, context):
        return compute_pb2.GetVmResponse(vm=self.fleet.get(self._visible(request.vm_id)).to_proto())

    async def ListVms(self, request, context):
        return compute_pb2.ListVmsResponse(vms=[vm.to_proto() for vm in self.fleet.visible()])

    async def StopVm(self, request, context):
        vm_id = self._visible(request.vm_id)
        # The guest's agent serves one connection: the relay lets go of it so compute can have the guest sync.
        try:
            relay = relay_pb2_grpc.RelayServiceStub(
                self.context.channel(self.context.directory.newest("relay").address)
            )
            await relay.CloseChannel(relay_pb2.CloseChannelRequest(vm_id=vm_id), timeout=5)
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            log.warning("relay_close_before_stop_failed", vm=vm_id, error=str(exc))
        return compute_pb2.StopVmResponse(vm=(await self.fleet.stop(vm_id)).to_proto())

    async def StartVm(self, request, context):
        return compute_pb2.StartVmResponse(vm=(await self.fleet.start(self._visible(request.vm_id))).to_proto())

    async def DeleteVm(self, request, context):
        await self.fleet.delete(self._visible(request.vm_id))
        return compute_pb2.DeleteVmResponse()

    async def PauseVm(self, request, context):
        return compute_pb2.PauseVmResponse(vm=(await self.fleet.pause(self._visible(request.vm_id))).to_proto())

    async def ResumeVm(self, request, context):
        return compute_pb2.ResumeVmResponse(vm=(await self.fleet.resume(self._visible(request.vm_id))).to_proto())

    async def SnapshotVm(self, request, context):
        size = await self.fleet.snapshot(self._visible(request.vm_id), request.snapshot_id, self._snapshot_store())
        return compute_pb2.SnapshotVmResponse(size_bytes=size)

    async def RestoreVm(self, request, context):
        store = self._snapshot_store()
        record = (
            await store.GetSnapshotRecord(snapshot_pb2.GetSnapshotRecordRequest(id=request.snapshot_id), timeout=10)
        ).record
        vm = await self.fleet.restore(request.vm_id, record, request.hostname, store, request.network_policy)
        return compute_pb2.RestoreVmResponse(vm=vm.to_proto())

    async def GetNodeCapacity(self, request, context):
        vcpus, memory = self.fleet.capacity()
        settings = self.fleet.settings
        return compute_pb2.GetNodeCapacityResponse(
            node=self.fleet.node,
            vcpus_total=settings.vcpus_total,
            vcpus_used=vcpus,
            memory_mib_total=settings.memory_mib_total,
            memory_mib_used=memory,
            vm_count=sum(1 for vm in self.fleet.visible() if vm.holds_resources),
            vmm=self.fleet.driver.name,
            accel=self.fleet.driver.accel,
            templates=self.fleet.templates(),
            max_vcpus_per_vm=settings.max_vcpus_per_vm,
            max_memory_mib_per_vm=settings.max_memory_mib_per_vm,
        )


async def wire(server, context: ServiceContext[ComputeSettings]) -> list[str]:
    settings = context.settings
    choice = hypervisor.choose(settings.vmm, settings.accel, settings.qemu_binary, settings.cloud_hypervisor_binary)
    driver = (
        CloudHypervisorDriver(choice, settings.cloud_hypervisor_binary)
        if choice.vmm == "cloud-hypervisor"
        else QemuDriver(choice, settings.qemu_binary, settings.tcg_tb_size_mib)
    )
    node_id = context.common.node
    network = NetworkLink(context, node_id) if context.common.networking else None
    fleet = VmFleet(settings, Path(context.common.state_dir), context.etcd, node_id, driver, network)
    await fleet.adopt()
    fleet.warm.start()
    context.registration_metadata.update(
        node=node_id, vmm=choice.vmm, accel=choice.accel, hypervisor_reason=choice.reason
    )
    context.on_shutdown.append(fleet.close)
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(ComputeServicer(fleet, context), server)
    return [compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name]
