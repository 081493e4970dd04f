"""SandboxServicer: the public SandboxService. Each RPC's handler lives in the module of its group."""

from __future__ import annotations

from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.common.server import ServiceContext
from services.gateway.exec import ExecHandlers
from services.gateway.files import FileHandlers
from services.gateway.lifecycle import SandboxLifecycle
from services.gateway.placement import SandboxPlacement
from services.gateway.records import SandboxStore
from services.gateway.snapshots import SnapshotHandlers


class SandboxServicer(
    SandboxLifecycle, ExecHandlers, FileHandlers, SnapshotHandlers, sandbox_service_pb2_grpc.SandboxServiceServicer
):
    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.store = SandboxStore(context.etcd)
        self.placement = SandboxPlacement(context)
