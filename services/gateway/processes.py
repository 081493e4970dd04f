"""BackgroundProcesses: StartProcess, ListProcesses, ConnectProcess, SendProcessInput and SignalProcess, routed to
the relay of the sandbox's node (the processes live in the guest's agent; the relay serves these methods)."""

from __future__ import annotations

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.validation import check_process, check_process_input, check_process_ref, check_signal, check_tag
from services.gateway.data_plane import DataPlane, on_node, with_sandbox_env


class BackgroundProcesses:
    def __init__(self, data: DataPlane) -> None:
        self.data, self.sandboxes, self.nodes = data, data.sandboxes, data.nodes

    async def start(self, request: api.StartProcessRequest, deadline: float | None) -> api.StartProcessResponse:
        check_process(request.process)
        check_tag(request.tag)
        record = await self.sandboxes.running(request.sandbox)
        forwarded = on_node(request, record)
        with_sandbox_env(forwarded.process, record)
        return await self.nodes.relay(record.node).StartProcess(forwarded, timeout=deadline)

    async def list(self, request: api.ListProcessesRequest, deadline: float | None) -> api.ListProcessesResponse:
        record = await self.sandboxes.running(request.sandbox)
        return await self.nodes.relay(record.node).ListProcesses(on_node(request, record), timeout=deadline)

    async def connect(self, request: api.ConnectProcessRequest, deadline: float | None):
        check_process_ref(request.pid, tail_bytes=request.tail_bytes)
        record = await self.sandboxes.running(request.sandbox)
        call = self.nodes.relay(record.node).ConnectProcess(on_node(request, record), timeout=deadline)
        async for event in self.data.follow(record, call):
            yield event

    async def send_input(self, request: api.SendProcessInputRequest, deadline: float | None):
        check_process_ref(request.pid)
        check_process_input(request.stdin)
        record = await self.sandboxes.running(request.sandbox)
        return await self.nodes.relay(record.node).SendProcessInput(on_node(request, record), timeout=deadline)

    async def signal(self, request: api.SignalProcessRequest, deadline: float | None) -> api.SignalProcessResponse:
        check_process_ref(request.pid)
        check_signal(request.signal)
        record = await self.sandboxes.running(request.sandbox)
        return await self.nodes.relay(record.node).SignalProcess(on_node(request, record), timeout=deadline)
