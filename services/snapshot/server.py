"""Wiring of the snapshot store. Content-addressed artifacts, lineage and retention come in the
snapshot issue; until then every RPC answers UNIMPLEMENTED naming the capability."""

from __future__ import annotations

from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.common.errors import Unimplemented
from services.common.server import ServiceContext
from services.common.settings import SnapshotSettings

_STORE = "snapshot artifact store"
_LINEAGE = "snapshot lineage and retention"


class SnapshotStoreServicer(snapshot_pb2_grpc.SnapshotStoreServiceServicer):
    async def PutArtifact(self, request_iterator, context):
        raise Unimplemented(_STORE)

    async def GetArtifact(self, request, context):
        raise Unimplemented(_STORE)
        yield  # an async generator, like every server-streaming handler

    async def CommitSnapshot(self, request, context):
        raise Unimplemented(_LINEAGE)

    async def GetSnapshotRecord(self, request, context):
        raise Unimplemented(_LINEAGE)

    async def ListSnapshotRecords(self, request, context):
        raise Unimplemented(_LINEAGE)

    async def DeleteSnapshotRecord(self, request, context):
        raise Unimplemented(_LINEAGE)

    async def VerifySnapshot(self, request, context):
        raise Unimplemented(_STORE)

    async def CollectGarbage(self, request, context):
        raise Unimplemented(_LINEAGE)

    async def GetStorageUsage(self, request, context):
        raise Unimplemented(_STORE)


async def wire(server, context: ServiceContext[SnapshotSettings]) -> list[str]:
    snapshot_pb2_grpc.add_SnapshotStoreServiceServicer_to_server(SnapshotStoreServicer(), server)
    return [snapshot_pb2.DESCRIPTOR.services_by_name["SnapshotStoreService"].full_name]
