"""ForkSandbox: one snapshot of a sandbox and N sandboxes restored from it in parallel, all or nothing.

A fork that keeps no snapshot, whose clones all fit on the source's node, never touches the snapshot store: the
snapshot stays on that node (SnapshotVmRequest.local_only) and every clone is placed there and restored from that
copy (RestoreVmRequest.local_snapshot). Uploading it only to delete it after took 0.7-0.8 s of a fork of 10 under
TCG (bench.breakdown, `compute.upload`). Otherwise (a kept snapshot, clones that need other nodes) the snapshot is
committed and verified like any other and the clones go wherever their source may go (its node selector).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import structlog

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument, ServiceError
from services.gateway.records import name_of
from services.gateway.sandbox_requests import parse_name, validate_labels

if TYPE_CHECKING:
    from services.gateway.snapshots import SnapshotOps

log = structlog.get_logger()
MAX_FORK = 64


async def fork_sandbox(ops: SnapshotOps, request: api.ForkSandboxRequest) -> api.ForkSandboxResponse:
    from services.gateway.snapshots import to_public

    count = request.count or 1
    if not 1 <= count <= MAX_FORK:
        raise InvalidArgument(f"count must be between 1 and {MAX_FORK}, got {count}")
    validate_labels(request.labels)
    source = await ops.sandboxes.store.get(parse_name(request.name))
    labels, more = {"forked-from": name_of(source)}, count > 1
    here = not request.keep_snapshot and await ops.sandboxes.placement.fits(source.node, source, count)
    if here:
        snapshot = await ops.take_here(source, labels, share_memory=more)
    else:
        snapshot = await ops.take(source, labels, share_memory=more)
        snapshot = await ops.verified(snapshot.id, snapshot)
    results = await asyncio.gather(
        *(
            ops.restore_into_new_sandbox(
                snapshot,
                request.labels,
                source.timeout_seconds,
                source.network_policy,
                source.node_selector,
                share_memory=more,
                kept_on=source.node if here else "",
            )
            for _ in range(count)
        ),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if not request.keep_snapshot and not here:
        # The clones run on their nodes' materialized copies, kept while a VM uses them: the record and its
        # stored chunks are not needed, and a fork should leave nothing the caller did not ask for.
        try:
            await ops.forget(snapshot)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            log.warning("fork_snapshot_not_deleted", snapshot=snapshot.id, error=str(exc))
    if failures:
        # All or nothing: a partial fork would leave the caller with clones it did not ask for.
        for clone in results:
            if not isinstance(clone, BaseException):
                try:
                    await ops.sandboxes.destroy(await ops.sandboxes.store.get(clone.name.split("/")[1]))
                except Exception as exc:
                    log.warning("fork_cleanup_failed", sandbox=clone.name, error=str(exc))
        raise failures[0]
    return api.ForkSandboxResponse(snapshot=to_public(snapshot), sandboxes=results)
