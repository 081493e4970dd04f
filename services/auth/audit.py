"""AuditLog: append-only, tamper-evident record of every mutating call, per tenant.

Entry n lives at `/microvm/auth/audit/<tenant>/<n, 20 digits>`; the head `/microvm/auth/audit-head/<tenant>`
holds the last sequence and hash. Each entry's hash covers its fields and the previous entry's hash, so
changing, removing or reordering one breaks the chain from there on.

Appends never give up because others append too. In one auth process, each tenant has one writer: appends wait in
the tenant's queue, and the writer puts every waiting event (up to `BATCH_LIMIT`) and the moved head in one
transaction, chained in arrival order; each caller returns when the transaction holding its event committed. The
head it committed is kept, so the next batch is one round trip to etcd, not a read and a write. Across
auth replicas the transaction is a compare-and-swap on the head: a batch that lost it to another replica is re-read,
re-chained after the winner's entries and tried again after a jittered, growing pause. Every lost round is another
replica's committed batch, so the log always advances; a batch fails only when etcd does (UNAVAILABLE, and then
the caller cannot know whether it landed) or after `CONTENDED_FOR` seconds of losing (ABORTED).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from collections import deque

import structlog
from google.protobuf import timestamp_pb2

from microvm.types.v1 import auth_pb2 as auth_types
from services.common.errors import Aborted, ServiceError, Unavailable
from services.common.records import AUDIT_EVENTS, AUDIT_HEADS, Records

log = structlog.get_logger()
# Events per transaction: etcd allows 128 operations in one (--max-txn-ops); one more is the head.
BATCH_LIMIT = 100
# Pauses between rounds lost to another replica: full jitter on a doubling base, capped.
BACKOFF_BASE, BACKOFF_CAP = 0.005, 0.25
# How long a batch may keep losing before its callers are told (ABORTED); far beyond any real contention.
CONTENDED_FOR = 30.0


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
    def __init__(self, etcd, batch_limit: int = BATCH_LIMIT) -> None:
        self.records = Records(etcd)
        self.batch_limit = batch_limit
        self._waiting: dict[str, deque[tuple[auth_types.AuditEvent, asyncio.Future]]] = {}
        self._writers: dict[str, asyncio.Task] = {}
        # Each tenant's head as this process last committed it (sequence, hash, revision): the next batch chains
        # after it without reading the head again. The compare-and-swap still guards it: a head another replica
        # moved meanwhile fails the swap, and the batch re-reads it.
        self._heads: dict[str, tuple[int, str, int]] = {}

    async def append(self, event: auth_types.AuditEvent) -> auth_types.AuditEvent:
        """The event as stored (sequence and hashes filled in), once its transaction committed."""
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        done = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(event.tenant, deque()).append((event, done))
        if event.tenant not in self._writers:
            writer = asyncio.create_task(self._write(event.tenant), name=f"audit-writer-{event.tenant}")
            self._writers[event.tenant] = writer
        # Once queued, the event is written even if this caller goes away: whether it lands must not depend on
        # how long the caller waited.
        return await asyncio.shield(done)

    async def drain(self, timeout: float = 10.0) -> None:
        """At shutdown (no new call arrives): what is queued is written before the process goes."""
        writers = list(self._writers.values())
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def _write(self, tenant: str) -> None:
        """The tenant's one writer in this process: commits what waits, batch after batch, until nothing does."""
        waiting = self._waiting[tenant]
        batch: list[tuple[auth_types.AuditEvent, asyncio.Future]] = []
        try:
            while waiting:
                batch = [waiting.popleft() for _ in range(min(len(waiting), self.batch_limit))]
                failure: ServiceError | None = None
                try:
                    await self._commit(tenant, [event for event, _ in batch])
                except ServiceError as exc:
                    failure = exc
                except Exception as exc:  # etcd failed: the transaction may or may not have landed
                    log.error("audit_write_failed", tenant=tenant, events=len(batch), error=repr(exc))
                    failure = Unavailable(f"the audit log could not be written: {exc!r}", reason="AUDIT_WRITE_FAILED")
                for event, done in batch:
                    if done.done():
                        continue
                    if failure is None:
                        done.set_result(event)
                    else:  # an exception of its own per caller: each raise adds to its traceback
                        done.set_exception(type(failure)(failure.message, reason=failure.reason))
                batch = []
        finally:
            # A writer stopped early (cancelled as the loop ends) fails whoever still waits for it.
            for _, done in [*batch, *waiting]:
                if not done.done():
                    done.set_exception(Unavailable("auth is stopping; not written", reason="AUDIT_WRITE_FAILED"))
            waiting.clear()
            del self._waiting[tenant], self._writers[tenant]

    async def _commit(self, tenant: str, events: list[auth_types.AuditEvent]) -> None:
        """Chains `events` after the head (as last committed here, else read) and writes them with the moved head in
        one compare-and-swap on the head; a lost round is re-read and re-chained."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CONTENDED_FOR
        for attempt in itertools.count():
            known = self._heads.pop(tenant, None)
            chained_on_known = known is not None
            if known is None:
                head = await self.records.get(AUDIT_HEADS, tenant)
                known = (head.message.sequence, head.message.hash, head.revision) if head else (0, "", 0)
            sequence, previous, revision = known
            puts = []
            for event in events:
                sequence += 1
                event.sequence, event.previous_hash = sequence, previous
                event.hash = previous = entry_hash(event)
                puts.append(self.records.put_op(AUDIT_EVENTS, event, tenant, f"{sequence:020d}"))
            puts.append(
                self.records.put_op(AUDIT_HEADS, auth_types.AuditHead(sequence=sequence, hash=previous), tenant)
            )
            committed_at = await self.records.commit([self.records.unchanged(AUDIT_HEADS, revision, tenant)], puts)
            if committed_at:
                self._heads[tenant] = (sequence, previous, committed_at)
                return
            if chained_on_known:
                continue  # the head we knew was stale (another replica appended): read it, and try at once
            if loop.time() > give_up:
                log.error("audit_contended", tenant=tenant, events=len(events), attempts=attempt + 1)
                raise Aborted("the audit log is too contended; retry", reason="AUDIT_CONTENDED")
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 10))))

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
