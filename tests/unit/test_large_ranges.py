"""A kind whose records together pass 4 MiB (grpc's default receive limit) is still read whole: the audit log of a
busy installation passed it and auth could no longer start (its start reads every record of its kinds). Against
the session's real etcd."""

from __future__ import annotations

import uuid

from microvm.types.v1 import sandbox_pb2
from services.common.records import SANDBOX_TOMBSTONES, Records

RECORD_BYTES = 1 << 20  # under etcd's 1.5 MiB request limit; six of them make a 6 MiB range


async def test_a_kind_past_four_mebibytes_is_listed_and_migrated(etcd):
    records = Records(etcd)
    tenant = f"big-{uuid.uuid4().hex[:6]}"
    ids = [f"{tenant}-{index}" for index in range(6)]
    try:
        for sandbox_id in ids:
            tombstone = sandbox_pb2.SandboxTombstone(tenant=tenant, name="x" * RECORD_BYTES, ended="deleted")
            await records.put(SANDBOX_TOMBSTONES, tombstone, sandbox_id)
        listed = [s for s in await records.list(SANDBOX_TOMBSTONES) if s.message.tenant == tenant]
        assert sorted(s.parts[0] for s in listed) == sorted(ids)
        assert await records.migrate(SANDBOX_TOMBSTONES) == 0  # nothing legacy, and no failure to read
    finally:
        for sandbox_id in ids:
            await records.delete(SANDBOX_TOMBSTONES, sandbox_id)
