"""TenantQuotas: reservations against a tenant's limits, atomic under any concurrency.

`/microvm/auth/usage/<tenant>` holds the tenant's current totals; each reservation is a key
`/microvm/auth/reservations/<tenant>/<id>`. Reserve and release are etcd transactions that compare the usage
key's revision (optimistic concurrency, retried): N concurrent creates admit exactly the remaining room.

The disk quota spans two writers: sandboxes are the gateway's records (each counted at its `disk_bytes`), snapshot
bytes are reserved here. A reservation of snapshot bytes counts the tenant's sandboxes and compares the gateway's
tenant guard (`/microvm/tenant-placements/<tenant>`, written with every new sandbox) in its transaction, as the
gateway's placement compares the usage key: whichever commits second sees the other.
"""

from __future__ import annotations

from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.errors import Aborted, ResourceExhausted
from services.common.records import QUOTA_RESERVATIONS, QUOTA_USAGE, SANDBOXES, TENANT_GUARDS, Records

FIELDS = ("sandboxes", "vcpus", "memory_mib", "snapshot_bytes")
LIMITS = {
    "sandboxes": "max_sandboxes",
    "vcpus": "max_vcpus",
    "memory_mib": "max_memory_mib",
    "snapshot_bytes": "max_snapshot_bytes",
}
ATTEMPTS = 200
FAILED = sandbox_types.SANDBOX_RECORD_STATE_FAILED  # its VM is gone: it holds no disk


def _combine(a: auth_types.QuotaAmount, b: auth_types.QuotaAmount, sign: int) -> auth_types.QuotaAmount:
    return auth_types.QuotaAmount(**{f: max(0, getattr(a, f) + sign * getattr(b, f)) for f in FIELDS})


class TenantQuotas:
    def __init__(self, etcd, credentials) -> None:
        self.records = Records(etcd)
        self.credentials = credentials

    async def _usage(self, tenant: str) -> tuple[auth_types.QuotaAmount, int]:
        stored = await self.records.get(QUOTA_USAGE, tenant)
        return (stored.message.used, stored.revision) if stored else (auth_types.QuotaAmount(), 0)

    async def reserve(self, tenant: str, reservation_id: str, amount: auth_types.QuotaAmount) -> None:
        quota = await self.credentials.tenant_quota(tenant)
        for _ in range(ATTEMPTS):
            usage, revision = await self._usage(tenant)
            if await self.records.get(QUOTA_RESERVATIONS, tenant, reservation_id) is not None:
                return  # already reserved: a retried call must not count twice
            after = _combine(usage, amount, +1)
            for field in FIELDS:
                limit = getattr(quota, LIMITS[field])
                # Only what this reservation asks for is checked: totals of other kinds may predate a limit.
                if limit and getattr(amount, field) and getattr(after, field) > limit:
                    raise ResourceExhausted(
                        f"tenant {tenant} quota exceeded: {field} would be {getattr(after, field)} of {limit}",
                        reason="QUOTA_EXCEEDED",
                        metadata={"tenant": tenant, "resource": field, "limit": str(limit)},
                    )
            guard = await self._check_disk(tenant, quota, amount, after) if quota.max_disk_bytes else []
            if await self.records.transaction(
                compare=[
                    self.records.unchanged(QUOTA_USAGE, revision, tenant),
                    self.records.unchanged(QUOTA_RESERVATIONS, 0, tenant, reservation_id),
                    *guard,
                ],
                success=[
                    self.records.put_op(QUOTA_USAGE, auth_types.QuotaUsage(used=after), tenant),
                    self.records.put_op(
                        QUOTA_RESERVATIONS, auth_types.QuotaReservation(amount=amount), tenant, reservation_id
                    ),
                ],
            ):
                return
        raise Aborted(f"quota of tenant {tenant} is too contended; retry", reason="QUOTA_CONTENDED")

    async def _check_disk(
        self, tenant: str, quota: auth_types.Quota, amount: auth_types.QuotaAmount, after: auth_types.QuotaAmount
    ) -> list:
        """RESOURCE_EXHAUSTED when snapshot bytes on top of the tenant's sandbox disks exceed its disk quota;
        returns the comparison that keeps the count true until the reservation commits."""
        if not amount.snapshot_bytes:
            return []
        guard = await self.records.get(TENANT_GUARDS, tenant)  # first: a sandbox placed after it changes it
        disks = sum(
            s.message.disk_bytes
            for s in await self.records.list(SANDBOXES)
            if s.message.tenant == tenant and s.message.state != FAILED
        )
        total = disks + after.snapshot_bytes
        if total > quota.max_disk_bytes:
            raise ResourceExhausted(
                f"tenant {tenant} quota exceeded: disk_bytes would be {total} of {quota.max_disk_bytes}",
                reason="QUOTA_EXCEEDED",
                metadata={"tenant": tenant, "resource": "disk_bytes", "limit": str(quota.max_disk_bytes)},
            )
        return [self.records.unchanged(TENANT_GUARDS, guard.revision if guard else 0, tenant)]

    async def release(self, tenant: str, reservation_id: str) -> None:
        for _ in range(ATTEMPTS):
            held = await self.records.get(QUOTA_RESERVATIONS, tenant, reservation_id)
            if held is None:
                return  # released already: idempotent
            usage, revision = await self._usage(tenant)
            after = _combine(usage, held.message.amount, -1)
            if await self.records.transaction(
                compare=[
                    self.records.unchanged(QUOTA_USAGE, revision, tenant),
                    self.records.unchanged(QUOTA_RESERVATIONS, held.revision, tenant, reservation_id),
                ],
                success=[
                    self.records.put_op(QUOTA_USAGE, auth_types.QuotaUsage(used=after), tenant),
                    self.records.delete_op(QUOTA_RESERVATIONS, tenant, reservation_id),
                ],
            ):
                return
        raise Aborted(f"quota of tenant {tenant} is too contended; retry", reason="QUOTA_CONTENDED")
