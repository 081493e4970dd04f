"""TenantQuotas: reservations against a tenant's limits, atomic under any concurrency.

`/microvm/auth/usage/<tenant>` holds the tenant's current totals; each reservation is a key
`/microvm/auth/reservations/<tenant>/<id>`. Reserve and release are etcd transactions that compare the usage
key's revision (optimistic concurrency, retried): N concurrent creates admit exactly the remaining room.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from microvm.auth.v1 import auth_pb2
from services.common.errors import Aborted, ResourceExhausted

USAGE = "/microvm/auth/usage/"
RESERVATIONS = "/microvm/auth/reservations/"
FIELDS = ("sandboxes", "vcpus", "memory_mib", "snapshot_bytes")
LIMITS = {
    "sandboxes": "max_sandboxes",
    "vcpus": "max_vcpus",
    "memory_mib": "max_memory_mib",
    "snapshot_bytes": "max_snapshot_bytes",
}
ATTEMPTS = 200


class TenantQuotas:
    def __init__(self, etcd, credentials) -> None:
        self.etcd = etcd
        self.credentials = credentials

    async def _usage(self, tenant: str) -> tuple[dict, int]:
        result = await self.etcd.get(f"{USAGE}{tenant}".encode())
        if result is None:
            return dict.fromkeys(FIELDS, 0), 0
        return json.loads(result.value), result.mod_revision

    def _compare_usage(self, tenant: str, revision: int):
        tx = self.etcd.transactions
        key = f"{USAGE}{tenant}".encode()
        return tx.version(key) == 0 if revision == 0 else tx.mod(key) == revision

    async def reserve(self, tenant: str, reservation_id: str, amount: auth_pb2.QuotaAmount) -> None:
        quota = await self.credentials.tenant_quota(tenant)
        wanted = json_format.MessageToDict(amount, preserving_proto_field_name=True)
        reservation_key = f"{RESERVATIONS}{tenant}/{reservation_id}".encode()
        tx = self.etcd.transactions
        for _ in range(ATTEMPTS):
            usage, revision = await self._usage(tenant)
            if await self.etcd.get(reservation_key) is not None:
                return  # already reserved: a retried call must not count twice
            after = {f: usage.get(f, 0) + int(wanted.get(f, 0)) for f in FIELDS}
            for field in FIELDS:
                limit = getattr(quota, LIMITS[field])
                if limit and after[field] > limit:
                    raise ResourceExhausted(
                        f"tenant {tenant} quota exceeded: {field} would be {after[field]} of {limit}",
                        reason="QUOTA_EXCEEDED",
                        metadata={"tenant": tenant, "resource": field, "limit": str(limit)},
                    )
            ok, _ = await self.etcd.transaction(
                compare=[self._compare_usage(tenant, revision), tx.version(reservation_key) == 0],
                success=[
                    tx.put(f"{USAGE}{tenant}".encode(), json.dumps(after).encode()),
                    tx.put(reservation_key, json.dumps(wanted).encode()),
                ],
                failure=[],
            )
            if ok:
                return
        raise Aborted(f"quota of tenant {tenant} is too contended; retry", reason="QUOTA_CONTENDED")

    async def release(self, tenant: str, reservation_id: str) -> None:
        reservation_key = f"{RESERVATIONS}{tenant}/{reservation_id}".encode()
        tx = self.etcd.transactions
        for _ in range(ATTEMPTS):
            held = await self.etcd.get(reservation_key)
            if held is None:
                return  # released already: idempotent
            amount = json.loads(held.value)
            usage, revision = await self._usage(tenant)
            after = {f: max(0, usage.get(f, 0) - int(amount.get(f, 0))) for f in FIELDS}
            ok, _ = await self.etcd.transaction(
                compare=[self._compare_usage(tenant, revision), tx.mod(reservation_key) == held.mod_revision],
                success=[tx.put(f"{USAGE}{tenant}".encode(), json.dumps(after).encode()), tx.delete(reservation_key)],
                failure=[],
            )
            if ok:
                return
        raise Aborted(f"quota of tenant {tenant} is too contended; retry", reason="QUOTA_CONTENDED")
