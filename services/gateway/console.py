"""ConsoleLogs: ReadConsoleLog, a sandbox's serial console log streamed from its node's compute service.

The control plane: the caller's request is checked here (who may read which sandbox, the shape of the range) and
translated into compute's ReadConsole for the sandbox's VM; compute keeps the log (services/compute/console.py).
"""

from __future__ import annotations

from microvm.compute.v1 import compute_pb2, compute_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import FailedPrecondition, Unavailable
from services.common.validation import check_console_read
from services.gateway.nodes import ClusterNodes
from services.gateway.sandbox_requests import parse_name
from services.gateway.sandboxes import Sandboxes


class ConsoleLogs:
    def __init__(self, sandboxes: Sandboxes, nodes: ClusterNodes) -> None:
        self.sandboxes, self.nodes = sandboxes, nodes

    async def read(self, request: api.ReadConsoleLogRequest, deadline: float | None):
        check_console_read(request.tail_bytes, request.offset, request.length)
        record = await self.sandboxes.store.get(parse_name(request.sandbox))
        if not record.node:
            raise FailedPrecondition(
                f"{request.sandbox} has no node yet", reason="SANDBOX_NOT_PLACED", metadata={"sandbox": request.sandbox}
            )
        if not self.nodes.alive(record.node):
            raise Unavailable(
                f"node {record.node} of {request.sandbox} is not answering (its lease ran out)",
                reason="NODE_UNAVAILABLE",
                metadata={"sandbox": request.sandbox, "node": record.node},
            )
        context = self.nodes.context
        compute = compute_pb2_grpc.ComputeServiceStub(
            context.channel(context.directory.newest("compute", record.node).address)
        )
        read = compute_pb2.ReadConsoleRequest(
            vm_id=record.id, tail_bytes=request.tail_bytes, offset=request.offset, length=request.length
        )
        call = compute.ReadConsole(read, timeout=deadline)
        try:
            async for chunk in call:
                yield api.ReadConsoleLogResponse(offset=chunk.offset, data=chunk.data)
        finally:
            call.cancel()  # a caller that went away stops the read on the node
