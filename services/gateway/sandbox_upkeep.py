"""The gateway's upkeep of sandbox records, run periodically by every replica: expired sandboxes deleted, deletions
and abandoned creates finished, old tombstones forgotten."""

from __future__ import annotations

import time

import grpc
import structlog

from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common import deadlines
from services.common.errors import ServiceError
from services.gateway.sandboxes import CREATING, Sandboxes

log = structlog.get_logger()

# The longest a gateway works on a create (a restore from a snapshot) and a margin: a record CREATING for longer
# than this was left by a gateway that died.
ABANDONED_CREATE_SECONDS = max(deadlines.VM_START, deadlines.SNAPSHOT) + 60
# How long a call naming a deleted sandbox is told what became of it.
TOMBSTONE_SECONDS = 86400.0


class SandboxUpkeep:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes

    async def sweep_tombstones(self) -> None:
        """Forgets what became of sandboxes gone for more than TOMBSTONE_SECONDS."""
        if swept := await self.sandboxes.store.sweep_tombstones(TOMBSTONE_SECONDS):
            log.info("sandbox_tombstones_swept", count=swept)

    async def reap_expired(self) -> None:
        """Deletes sandboxes whose timeout passed, retries deletions that failed, and takes creates whose gateway
        died between placing the record and starting its VM: only `start` moves a record out of CREATING, and the
        gateway that ran it has given up on it (its VM call's deadline passed) once `ABANDONED_CREATE_SECONDS` have
        gone by, so nobody else ever would; the record would hold quota and capacity until it expired."""
        now = time.time()
        for record in await self.sandboxes.store.list(every_tenant=True):
            age = now - record.update_time.ToSeconds()
            stuck = (record.state == sandbox_types.SANDBOX_RECORD_STATE_DELETING and age > 30) or (
                record.state == CREATING and age > ABANDONED_CREATE_SECONDS
            )
            if record.expire_time.ToSeconds() > now and not stuck:
                continue
            if record.state == sandbox_types.SANDBOX_RECORD_STATE_MIGRATING:
                continue  # the drain that moves it owns it until it lands
            try:
                await self.sandboxes.destroy(record, "expired" if record.expire_time.ToSeconds() <= now else "deleted")
                log.info("sandbox_expired", sandbox=record.id)
            except (ServiceError, grpc.aio.AioRpcError) as exc:
                log.warning("sandbox_reap_failed", sandbox=record.id, error=str(exc))
