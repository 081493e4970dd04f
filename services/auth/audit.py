"""AuditLog: append-only, tamper-evident record of every mutating call, per tenant.

Entry n lives at `/microvm/auth/audit/<tenant>/<n, 20 digits>`; the head `/microvm/auth/audit-head/<tenant>`
holds the last sequence and hash. Each entry's hash covers its fields and the previous entry's hash, so
changing, removing or reordering one breaks the chain from there on. Appends are transactions on the head.
"""

from __future__ import annotations

import hashlib
import json

from google.protobuf import json_format, timestamp_pb2

from microvm.auth.v1 import auth_pb2
from services.common.errors import Aborted

ENTRIES = "/microvm/auth/audit/"
HEAD = "/microvm/auth/audit-head/"


def entry_hash(event: auth_pb2.AuditEvent) -> str:
    fields = [
        str(event.sequence),
        event.tenant,
        event.principal,
        event.method,
        event.target,
        event.result,
        str(event.time.ToNanoseconds()),
        event.previous_hash,
    ]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()


def chain_valid(events: list[auth_pb2.AuditEvent]) -> bool:
    for index, event in enumerate(events):
        if entry_hash(event) != event.hash:
            return False
        if index and (
            event.previous_hash != events[index - 1].hash or event.sequence != events[index - 1].sequence + 1
        ):
            return False
    return True


class AuditLog:
    def __init__(self, etcd) -> None:
        self.etcd = etcd

    async def append(self, event: auth_pb2.AuditEvent) -> auth_pb2.AuditEvent:
        tx = self.etcd.transactions
        head_key = f"{HEAD}{event.tenant}".encode()
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        for _ in range(200):
            head = await self.etcd.get(head_key)
            sequence, previous = (
                (json.loads(head.value)["sequence"], json.loads(head.value)["hash"]) if head else (0, "")
            )
            event.sequence, event.previous_hash = sequence + 1, previous
            event.hash = entry_hash(event)
            compare = [tx.mod(head_key) == head.mod_revision] if head else [tx.version(head_key) == 0]
            ok, _ = await self.etcd.transaction(
                compare=compare,
                success=[
                    tx.put(
                        f"{ENTRIES}{event.tenant}/{event.sequence:020d}".encode(),
                        json_format.MessageToJson(event).encode(),
                    ),
                    tx.put(head_key, json.dumps({"sequence": event.sequence, "hash": event.hash}).encode()),
                ],
                failure=[],
            )
            if ok:
                return event
        raise Aborted("audit log is too contended; retry", reason="AUDIT_CONTENDED")

    async def list(
        self, tenant: str, start: timestamp_pb2.Timestamp | None, end: timestamp_pb2.Timestamp | None
    ) -> tuple[list[auth_pb2.AuditEvent], bool]:
        result = await self.etcd.get_prefix(f"{ENTRIES}{tenant}/".encode(), sort_order="ascend")
        events = [json_format.Parse(kv.value, auth_pb2.AuditEvent()) for kv in result]
        valid = chain_valid(events)
        if start is not None and start.ToNanoseconds():
            events = [e for e in events if e.time.ToNanoseconds() >= start.ToNanoseconds()]
        if end is not None and end.ToNanoseconds():
            events = [e for e in events if e.time.ToNanoseconds() < end.ToNanoseconds()]
        return events, valid
