"""Wiring of the relay, and its two thin servicers.

The relay of a node owns every agent channel on it. It serves
- the exec and file methods of the public `SandboxService` (data plane): the gateway forwards a caller's call
  here unchanged; the sandbox id names the VM, whose record says where its agent is;
- `GuestControlService` (control plane): the node's compute service talks to its guests through it.
"""

from __future__ import annotations

from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.sandbox.v1 import (
    code_service_pb2,
    code_service_pb2_grpc,
    desktop_service_pb2,
    desktop_service_pb2_grpc,
    port_forward_service_pb2,
    port_forward_service_pb2_grpc,
    sandbox_service_pb2,
    sandbox_service_pb2_grpc,
)
from microvm.types.v1 import vm_pb2
from services.common.records import CHANNEL_INCIDENTS, Records
from services.common.server import ServiceContext
from services.common.settings import RelaySettings
from services.relay.agent_channel import AgentStream, AgentTarget
from services.relay.archives import GuestArchives
from services.relay.background import GuestBackground
from services.relay.channel_pool import ChannelPool
from services.relay.code import GuestCode
from services.relay.desktop import GuestDesktop
from services.relay.files import GuestFiles
from services.relay.guest_clock import sync_all, sync_quietly
from services.relay.guest_control import GuestControl
from services.relay.port_forward import GuestPorts
from services.relay.processes import GuestProcesses
from services.relay.vms import NodeVms, target_of
from services.relay.watch import GuestWatches


class DataPlaneServicer(sandbox_service_pb2_grpc.SandboxServiceServicer):
    """The exec and file methods of the public API (the others are the gateway's: UNIMPLEMENTED here)."""

    def __init__(
        self,
        processes: GuestProcesses,
        files: GuestFiles,
        archives: GuestArchives | None = None,
        watches: GuestWatches | None = None,
    ) -> None:
        self.processes, self.files = processes, files
        self.archives = archives or GuestArchives(files.open_stream)
        self.watches = watches or GuestWatches(files.open_stream)
        self.background = GuestBackground(files.open_stream)

    async def Exec(self, request, context):
        async for event in self.processes.exec(request):
            yield event

    async def StartProcess(self, request, context):
        return await self.background.start(request)

    async def ListProcesses(self, request, context):
        return await self.background.list(request)

    async def ConnectProcess(self, request, context):
        async for event in self.background.connect(request):
            yield event

    async def SendProcessInput(self, request, context):
        return await self.background.send_input(request)

    async def SignalProcess(self, request, context):
        return await self.background.signal(request)

    async def ExecInteractive(self, request_iterator, context):
        async for event in self.processes.exec_interactive(request_iterator):
            yield event

    async def WriteFile(self, request_iterator, context):
        return await self.files.write(request_iterator)

    async def ReadFile(self, request, context):
        async for chunk in self.files.read(request):
            yield chunk

    async def ListDir(self, request, context):
        return await self.files.list_dir(request)

    async def Stat(self, request, context):
        return await self.files.stat(request)

    async def MakeDir(self, request, context):
        return await self.files.make_dir(request)

    async def Remove(self, request, context):
        return await self.files.remove(request)

    async def Rename(self, request, context):
        return await self.files.rename(request)

    async def UploadArchive(self, request_iterator, context):
        return await self.archives.upload(request_iterator)

    async def DownloadArchive(self, request, context):
        async for chunk in self.archives.download(request):
            yield chunk

    async def WatchDir(self, request, context):
        async for event in self.watches.watch(request):
            yield event


class CodeServicer(code_service_pb2_grpc.CodeServiceServicer):
    """The public CodeService on this node's guests (the gateway forwards callers' calls here)."""

    def __init__(self, code: GuestCode) -> None:
        self.code = code

    async def RunCode(self, request, context):
        async for event in self.code.run(request):
            yield event

    async def CreateCodeContext(self, request, context):
        return await self.code.create_context(request)

    async def ListCodeContexts(self, request, context):
        return await self.code.list_contexts(request)

    async def RestartCodeContext(self, request, context):
        return await self.code.restart_context(request)

    async def DeleteCodeContext(self, request, context):
        return await self.code.delete_context(request)

    async def InterruptCode(self, request, context):
        return await self.code.interrupt(request)


class DesktopServicer(desktop_service_pb2_grpc.DesktopServiceServicer):
    """The public DesktopService on this node's guests (the gateway forwards callers' calls here)."""

    def __init__(self, desktop: GuestDesktop) -> None:
        self.desktop = desktop

    async def Screenshot(self, request, context):
        return await self.desktop.screenshot(request)

    async def GetDesktop(self, request, context):
        return await self.desktop.describe(request)

    async def DesktopAction(self, request, context):
        return await self.desktop.act(request)

    async def WaitForScreen(self, request, context):
        return await self.desktop.wait(request)

    async def StartRecording(self, request, context):
        return await self.desktop.start_recording(request)

    async def StopRecording(self, request, context):
        return await self.desktop.stop_recording(request)


class PortForwardServicer(port_forward_service_pb2_grpc.PortForwardServiceServicer):
    def __init__(self, ports: GuestPorts) -> None:
        self.ports = ports

    async def ForwardPort(self, request_iterator, context):
        async for event in self.ports.forward(request_iterator):
            yield event


class GuestControlServicer(relay_pb2_grpc.GuestControlServiceServicer):
    def __init__(self, control: GuestControl) -> None:
        self.control = control

    async def WaitForAgent(self, request, context):
        return await self.control.wait_for_agent(request.vm_id, request.timeout_ms)

    async def ConfigureNetwork(self, request, context):
        await self.control.configure_network(request.vm_id)
        return relay_pb2.ConfigureNetworkResponse()

    async def SetGuestIdentity(self, request, context):
        await self.control.set_identity(request.vm_id, request.hostname, request.confirm_later)
        return relay_pb2.SetGuestIdentityResponse()

    async def RunCommand(self, request, context):
        return relay_pb2.RunCommandResponse(
            exit_code=await self.control.run(request.vm_id, request.argv, request.timeout_ms)
        )

    async def CloseChannel(self, request, context):
        await self.control.close(request.vm_id)
        return relay_pb2.CloseChannelResponse()

    async def SyncGuestClock(self, request, context):
        return await self.control.sync_clock(request.vm_id)


class NodeRelay:
    """The node's channels and VM records, and the stream opener both servicers use."""

    def __init__(self, etcd, node: str, settings: RelaySettings) -> None:
        self.records, self.node = Records(etcd), node
        self.settings = settings
        self.pool = ChannelPool(
            settings.connect_timeout_seconds,
            settings.limits(),
            on_violation=self.record_incident,
            on_connected=lambda channel: sync_quietly(channel, settings.connect_timeout_seconds),
            is_paused=lambda vm_id: self.vms.is_paused(vm_id),
        )
        self.vms = NodeVms(etcd, node, on_removed=self.forget)
        self.control = GuestControl(
            self.vms, self.pool, settings.connect_timeout_seconds, on_unconfirmed=self.record_incident
        )
        self.processes = GuestProcesses(self.open_stream)
        self.files = GuestFiles(self.open_stream)

    async def record_incident(self, target: AgentTarget, reason: str) -> None:
        """The sandbox reads FAILED with `reason` (the gateway merges the record into what callers see)."""
        incident = vm_pb2.ChannelIncident(reason=reason, vmm_pid=target.generation)
        incident.time.GetCurrentTime()
        await self.records.put(CHANNEL_INCIDENTS, incident, self.node, target.vm_id)

    async def forget(self, vm: vm_pb2.VmRecord) -> None:
        """The VM is gone: its channel, quarantine and incident go too. Unless its guest carries on under another id
        (a pooled VM claimed by a create: compute writes the new record before it removes the old, same VMM process
        and agent socket): then the channel and any quarantine stay, renamed."""
        target = target_of(vm)
        successor = next((v for v in self.vms.vms.values() if target_of(v).endpoint == target.endpoint), None)
        if successor is not None:
            self.pool.rename(target_of(successor))
        else:
            await self.pool.close(target)
            self.pool.quarantined = {k: v for k, v in self.pool.quarantined.items() if k[0] != target.endpoint}
        await self.records.delete(CHANNEL_INCIDENTS, self.node, vm.id)

    async def sync_clocks(self) -> None:
        running = [channel for channel in self.pool.open_channels() if not channel.paused()]
        await sync_all(running, self.settings.connect_timeout_seconds)

    async def open_stream(self, vm_id: str) -> AgentStream:
        channel = await self.pool.get(await self.vms.target(vm_id))
        return channel.open_stream()

    async def close(self) -> None:
        await self.control.stop_confirming()
        await self.vms.close()
        await self.pool.close_all()


async def wire(server, context: ServiceContext[RelaySettings]) -> list[str]:
    relay = NodeRelay(context.etcd, context.common.node, context.settings)
    await relay.vms.open()
    context.on_shutdown.append(relay.close)
    if context.settings.clock_sync_seconds:
        context.every(context.settings.clock_sync_seconds, relay.sync_clocks, "guest-clocks")
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(
        DataPlaneServicer(relay.processes, relay.files), server
    )
    code_service_pb2_grpc.add_CodeServiceServicer_to_server(CodeServicer(GuestCode(relay.open_stream)), server)
    port_forward_service_pb2_grpc.add_PortForwardServiceServicer_to_server(
        PortForwardServicer(GuestPorts(relay.open_stream)), server
    )
    desktop_service_pb2_grpc.add_DesktopServiceServicer_to_server(
        DesktopServicer(GuestDesktop(relay.open_stream)), server
    )
    relay_pb2_grpc.add_GuestControlServiceServicer_to_server(GuestControlServicer(relay.control), server)
    return [
        port_forward_service_pb2.DESCRIPTOR.services_by_name["PortForwardService"].full_name,
        desktop_service_pb2.DESCRIPTOR.services_by_name["DesktopService"].full_name,
        code_service_pb2.DESCRIPTOR.services_by_name["CodeService"].full_name,
        sandbox_service_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name,
        relay_pb2.DESCRIPTOR.services_by_name["GuestControlService"].full_name,
    ]
