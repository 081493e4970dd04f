"""The gateway's upkeep of sandbox records, run periodically by every replica: expired sandboxes deleted, deletions
and abandoned creates finished, old tombstones forgotten."""

from __future__ import annotations

import functools
import time

import grpc
import structlog

from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import vm_pb2
from services.common import deadlines
from services.common.errors import ServiceError
from services.gateway.sandboxes import CREATING, Sandboxes, mark_running

log = structlog.get_logger()

# The longest a gateway works on a create (a restore from a snapshot) and a margin: a record CREATING for longer
# than this was left by a gateway that died.
ABANDONED_CREATE_SECONDS = max(deadlines.VM_START, deadlines.SNAPSHOT) + 60
# A create whose gateway's registration is gone is settled once its record is this old: a gateway's registration
# reaches another replica's directory through a watch, so a record can be seen before its writer is.
GONE_GATEWAY_GRACE_SECONDS = 10.0
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
        gone by, so nobody else ever would; the record would hold quota and capacity until it expired. A create whose
        gateway is known to be gone (its registration lapsed: `creating_gateway`) is settled sooner, ten seconds on."""
        now = time.time()
        gateways = {instance.instance_id for instance in self.sandboxes.context.directory.instances("gateway")}
        # A directory that does not show this gateway itself is not to be trusted about the others.
        trusted = self.sandboxes.context.instance_id in gateways
        for record in await self.sandboxes.store.list(every_tenant=True):
            age = now - record.update_time.ToSeconds()
            if (
                trusted
                and record.state == CREATING
                and record.creating_gateway
                and record.creating_gateway not in gateways
                and GONE_GATEWAY_GRACE_SECONDS < age <= ABANDONED_CREATE_SECONDS
            ):
                await self._settle_create_of_a_gone_gateway(record)
                continue
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

    async def _settle_create_of_a_gone_gateway(self, record) -> None:
        """The create of a gateway that is gone (killed after it placed the record): nobody else would finish it.
        Its VM running, the create is finished as that gateway would have (the caller's retry then finds its
        sandbox); its VM gone or failed, the record goes (quota released, the name free for a new create). A VM its
        node is still starting is left for a later pass."""
        vm = await self.sandboxes.store.vm(record)
        if vm is not None and vm.state == vm_pb2.VM_STATE_CREATING and self.sandboxes.nodes.alive(record.node):
            return
        try:
            if vm is not None and vm.state == vm_pb2.VM_STATE_RUNNING:
                await self.sandboxes.store.change(
                    record, functools.partial(mark_running, vm=vm), expect_states={CREATING}
                )
                log.info(
                    "sandbox_create_finished_for_a_gone_gateway", sandbox=record.id, gateway=record.creating_gateway
                )
            else:
                await self.sandboxes.destroy(record)
                log.info("sandbox_create_of_a_gone_gateway_undone", sandbox=record.id, gateway=record.creating_gateway)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("sandbox_create_settle_failed", sandbox=record.id, error=str(exc))
