"""The gateway's servicers: each RPC is a line into the typed implementation that in-process callers use too."""

from __future__ import annotations

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.gateway.console import ConsoleLogs
from services.gateway.data_plane import DataPlane
from services.gateway.exposed_ports import ExposedPorts
from services.gateway.node_admin import NodeAdmin
from services.gateway.processes import BackgroundProcesses
from services.gateway.sandboxes import Sandboxes
from services.gateway.snapshots import SnapshotOps
from services.gateway.template_service import TemplateOps


class SandboxServicer(sandbox_service_pb2_grpc.SandboxServiceServicer):
    def __init__(
        self,
        sandboxes: Sandboxes,
        snapshots: SnapshotOps,
        data: DataPlane,
        ports: ExposedPorts,
        console: ConsoleLogs,
        templates: TemplateOps,
    ) -> None:
        self.sandboxes, self.snapshots, self.data, self.ports = sandboxes, snapshots, data, ports
        self.console, self.templates = console, templates
        self.processes = BackgroundProcesses(data)

    async def CreateSandbox(self, request, context):
        return api.CreateSandboxResponse(sandbox=await self.sandboxes.create(request))

    async def GetSandbox(self, request, context):
        return api.GetSandboxResponse(sandbox=await self.sandboxes.get(request.name))

    async def ListSandboxes(self, request, context):
        return await self.sandboxes.list(request)

    async def UpdateSandbox(self, request, context):
        return api.UpdateSandboxResponse(sandbox=await self.sandboxes.update(request))

    async def DeleteSandbox(self, request, context):
        await self.sandboxes.delete(request.name)
        return api.DeleteSandboxResponse()

    async def PauseSandbox(self, request, context):
        return api.PauseSandboxResponse(sandbox=await self.sandboxes.set_paused(request.name, True))

    async def ResumeSandbox(self, request, context):
        return api.ResumeSandboxResponse(sandbox=await self.sandboxes.set_paused(request.name, False))

    async def ExposePort(self, request, context):
        return await self.ports.expose(request)

    async def UnexposePort(self, request, context):
        return await self.ports.unexpose(request)

    async def Exec(self, request, context):
        async for event in self.data.exec(request, context.time_remaining()):
            yield event

    async def StartProcess(self, request, context):
        return await self.processes.start(request, context.time_remaining())

    async def ListProcesses(self, request, context):
        return await self.processes.list(request, context.time_remaining())

    async def ConnectProcess(self, request, context):
        async for event in self.processes.connect(request, context.time_remaining()):
            yield event

    async def SendProcessInput(self, request, context):
        return await self.processes.send_input(request, context.time_remaining())

    async def SignalProcess(self, request, context):
        return await self.processes.signal(request, context.time_remaining())

    async def ExecInteractive(self, request_iterator, context):
        async for event in self.data.exec_interactive(request_iterator, context.time_remaining()):
            yield event

    async def WriteFile(self, request_iterator, context):
        return await self.data.write_file(request_iterator, context.time_remaining())

    async def ReadFile(self, request, context):
        async for chunk in self.data.read_file(request, context.time_remaining()):
            yield chunk

    async def ReadConsoleLog(self, request, context):
        async for chunk in self.console.read(request, context.time_remaining()):
            yield chunk

    async def ListDir(self, request, context):
        return await self.data.unary("ListDir", request, context.time_remaining())

    async def Stat(self, request, context):
        return await self.data.unary("Stat", request, context.time_remaining())

    async def MakeDir(self, request, context):
        return await self.data.unary("MakeDir", request, context.time_remaining())

    async def Remove(self, request, context):
        return await self.data.unary("Remove", request, context.time_remaining())

    async def Rename(self, request, context):
        return await self.data.unary("Rename", request, context.time_remaining())

    async def UploadArchive(self, request_iterator, context):
        return await self.data.upload_archive(request_iterator, context.time_remaining())

    async def DownloadArchive(self, request, context):
        async for chunk in self.data.download_archive(request, context.time_remaining()):
            yield chunk

    async def WatchDir(self, request, context):
        async for event in self.data.watch_dir(request, context.time_remaining()):
            yield event

    async def CreateSnapshot(self, request, context):
        return api.CreateSnapshotResponse(snapshot=await self.snapshots.create(request))

    async def GetSnapshot(self, request, context):
        return api.GetSnapshotResponse(snapshot=await self.snapshots.get(request.name))

    async def ListSnapshots(self, request, context):
        return await self.snapshots.list(request)

    async def DeleteSnapshot(self, request, context):
        await self.snapshots.delete(request.name)
        return api.DeleteSnapshotResponse()

    async def RestoreSnapshot(self, request, context):
        return api.RestoreSnapshotResponse(sandbox=await self.snapshots.restore(request))

    async def ForkSandbox(self, request, context):
        return await self.snapshots.fork(request)

    async def ListTemplates(self, request, context):
        return await self.templates.list_all(request)


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self, admin: NodeAdmin) -> None:
        self.admin = admin

    async def ListNodes(self, request, context):
        return nodes_pb2.ListNodesResponse(nodes=await self.admin.list())

    async def GetNode(self, request, context):
        return nodes_pb2.GetNodeResponse(node=await self.admin.get(request.name))

    async def CordonNode(self, request, context):
        return nodes_pb2.CordonNodeResponse(node=await self.admin.cordon(request.name, request.reason))

    async def UncordonNode(self, request, context):
        return nodes_pb2.UncordonNodeResponse(node=await self.admin.uncordon(request.name))

    async def DrainNode(self, request, context):
        return await self.admin.drain(request.name, request.migrate, request.reason)
