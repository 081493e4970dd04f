"""AuditLog: append-only, tamper-evident record of every mutating call, per tenant.

Entry n lives at `/microvm/auth/audit/<tenant>/<n, 20 digits>`; the head `/microvm/auth/audit-head/<tenant>`
holds the last sequence and hash. Each entry's hash covers its fields and the previous entry's hash, so
changing, removing or reordering one breaks the chain from there on. Appends are transactions on the head.
"""

from __future__ import annotations

import hashlib

from google.protobuf import timestamp_pb2

from microvm.types.v1 import auth_pb2 as auth_types
from services.common.errors import Aborted
from services.common.records import AUDIT_EVENTS, AUDIT_HEADS, Records


def entry_hash(event: auth_types.AuditEvent) -> str:
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


def chain_valid(events: list[auth_types.AuditEvent]) -> bool:
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
        self.records = Records(etcd)

    async def append(self, event: auth_types.AuditEvent) -> auth_types.AuditEvent:
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        for _ in range(200):
            head = await self.records.get(AUDIT_HEADS, event.tenant)
            sequence, previous = (head.message.sequence, head.message.hash) if head else (0, "")
            event.sequence, event.previous_hash = sequence + 1, previous
            event.hash = entry_hash(event)
            if await self.records.transaction(
                compare=[self.records.unchanged(AUDIT_HEADS, head.revision if head else 0, event.tenant)],
                success=[
                    self.records.put_op(AUDIT_EVENTS, event, event.tenant, f"{event.sequence:020d}"),
                    self.records.put_op(
                        AUDIT_HEADS, auth_types.AuditHead(sequence=event.sequence, hash=event.hash), event.tenant
                    ),
                ],
            ):
                return event
        raise Aborted("audit log is too contended; retry", reason="AUDIT_CONTENDED")

    async def list(
        self, tenant: str, start: timestamp_pb2.Timestamp | None, end: timestamp_pb2.Timestamp | None
    ) -> tuple[list[auth_types.AuditEvent], bool]:
        events = sorted((s.message for s in await self.records.list(AUDIT_EVENTS, tenant)), key=lambda e: e.sequence)
        valid = chain_valid(events)
        if start is not None and start.ToNanoseconds():
            events = [e for e in events if e.time.ToNanoseconds() >= start.ToNanoseconds()]
        if end is not None and end.ToNanoseconds():
            events = [e for e in events if e.time.ToNanoseconds() < end.ToNanoseconds()]
        return events, valid
