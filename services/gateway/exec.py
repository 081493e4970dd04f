"""Exec and ExecInteractive: process streams from a sandbox's agent, through the relay, to the caller.

The stream is bound to the compute instance that supervises the VM: if that instance dies mid-stream the
call ends UNAVAILABLE (the guest process is killed) instead of hanging on a VM nobody watches.
Cancellation and deadlines propagate: the relay call is cancelled, and the relay kills the guest process.
"""

from __future__ import annotations

import asyncio

import grpc

from microvm.relay.v1 import relay_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.gateway.lifecycle import parse_name
from services.gateway.records import SandboxRecord

MAX_EXEC_STDIN = 4 << 20
NODE_CHECK_SECONDS = 0.5


class ExecHandlers:
    """Mixin of SandboxServicer."""

    async def running_record(self, name: str) -> SandboxRecord:
        record = await self.store.get(parse_name(name))
        if record.sandbox.state != sandbox_pb2.SANDBOX_STATE_RUNNING:
            raise FailedPrecondition(
                f"sandbox {record.id} is {sandbox_pb2.SandboxState.Name(record.sandbox.state)}"
                + (f": {record.sandbox.failure_message}" if record.sandbox.failure_message else ""),
                reason="SANDBOX_NOT_RUNNING",
                metadata={"sandbox": record.sandbox.name},
            )
        return record

    @staticmethod
    def agent_target(record: SandboxRecord) -> relay_pb2.AgentTarget:
        return relay_pb2.AgentTarget(
            vm_id=record.id, node=record.node, transport=record.agent_transport, socket_path=record.agent_socket
        )

    async def _guarded(self, record: SandboxRecord, call):
        """Yields the relay call's responses while the VM's compute instance stays registered."""
        instance_key = self.context.directory.newest("compute", record.node).key
        responses = call.__aiter__()
        node_lost = asyncio.Event()

        async def watch_node():
            while any(i.key == instance_key for i in self.context.directory.instances("compute")):
                await asyncio.sleep(NODE_CHECK_SECONDS)
            node_lost.set()
            call.cancel()

        watcher = asyncio.create_task(watch_node())
        try:
            while True:
                try:
                    response = await responses.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if node_lost.is_set():
                        break
                    raise
                except grpc.aio.AioRpcError as exc:
                    if node_lost.is_set() or exc.code() == grpc.StatusCode.CANCELLED and node_lost.is_set():
                        break
                    raise
                yield response
        finally:
            watcher.cancel()
            call.cancel()
        raise Unavailable(
            f"compute node {record.node} went away while the process ran; the process was stopped",
            reason="NODE_UNAVAILABLE",
            metadata={"node": record.node},
        )

    async def Exec(self, request, context):
        record = await self.running_record(request.sandbox)
        if len(request.stdin) > MAX_EXEC_STDIN:
            raise InvalidArgument(f"stdin is limited to {MAX_EXEC_STDIN} bytes in Exec; use ExecInteractive")
        call = self.placement.relay().Exec(
            relay_pb2.ExecRequest(target=self.agent_target(record), process=request.process, stdin=request.stdin),
            timeout=context.time_remaining(),
        )
        async for response in self._guarded(record, call):
            yield response.event

    async def ExecInteractive(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "config":
            raise InvalidArgument("the first ExecInteractive message must carry the config")
        record = await self.running_record(first.config.sandbox)
        target = self.agent_target(record)

        async def upstream():
            yield relay_pb2.ExecInteractiveRequest(target=target, request=first)
            async for message in request_iterator:
                yield relay_pb2.ExecInteractiveRequest(request=message)

        call = self.placement.relay().ExecInteractive(upstream(), timeout=context.time_remaining())
        async for response in self._guarded(record, call):
            yield api.ExecInteractiveResponse(event=response.event)
