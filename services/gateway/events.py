"""SandboxEvents and EventServicer: the public EventService (WatchEvents), and the event feed webhooks deliver.

A watch reads the records as they were at its starting revision (services/gateway/event_derivation.py), then an etcd
watch from the next revision on: every event after the cursor comes once, in order, and nothing is kept in memory
between calls, so any gateway replica resumes any cursor. A cursor is `<revision>.<index>` for an event (the index
among the events of that revision) and `<revision>` for a progress (everything up to that revision was sent).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aetcd.exceptions
import grpc

from microvm.sandbox.v1 import event_service_pb2 as api
from microvm.sandbox.v1 import event_service_pb2_grpc
from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import event_pb2
from services.common.errors import InvalidArgument, PermissionDenied, ServiceError
from services.common.records import EVENT_FENCES, Records
from services.gateway.access import current_principal
from services.gateway.event_derivation import WATCHED, Derived, SandboxEventDeriver
from services.gateway.event_history import Compacted, EtcdHistory, FutureRevision
from services.gateway.records import name_of
from services.gateway.sandbox_requests import validate_labels

KEEPALIVE_SECONDS = 15.0
CURSOR = re.compile(r"^(\d{1,18})(?:\.(\d{1,9}))?$")
EVERY_TENANT = "*"


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


@dataclass(frozen=True, order=True)
class Cursor:
    """A place in the event history: after every event of `revision` (index None), or after its `index`th."""

    revision: int
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = CURSOR.fullmatch(text)
        if match is None:
            raise InvalidArgument(
                f"cursor {text[:64]!r} is not one WatchEvents gave: expected <revision> or <revision>.<index>",
                reason="BAD_CURSOR",
            )
        return cls(int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None)

    def __str__(self) -> str:
        return str(self.revision) if self.index is None else f"{self.revision}.{self.index}"


@dataclass(frozen=True)
class Progress:
    cursor: Cursor
    caught_up: bool


def compacted(cursor: Cursor) -> OutOfRange:
    return OutOfRange(
        f"cursor {cursor} is older than the event history etcd keeps (it was compacted): list the sandboxes "
        "(ListSandboxes) for where they stand, then watch again without a cursor",
        reason="EVENTS_COMPACTED",
        metadata={"cursor": str(cursor)},
    )


def to_public(derived: Derived, revision: int, index: int) -> api.SandboxEvent:
    record = derived.record
    event = api.SandboxEvent(
        cursor=str(Cursor(revision, index)),
        revision=revision,
        type=derived.type,
        sandbox=f"sandboxes/{name_of(record)}",
        tenant=record.tenant,
        labels=record.labels,
        template=record.template,
        node=record.node,
        state=derived.state,
        message=derived.message,
        snapshot=derived.snapshot,
    )
    event.time.CopyFrom(derived.time)
    return event


def check_types(types) -> frozenset[int]:
    for kind in types:
        if kind == event_pb2.SANDBOX_EVENT_TYPE_UNSPECIFIED or kind not in event_pb2.SandboxEventType.values():
            raise InvalidArgument(f"unknown event type {kind}", reason="BAD_EVENT_TYPE")
    return frozenset(types)


def matcher(labels: Mapping[str, str], types: frozenset[int]) -> Callable[[api.SandboxEvent], bool]:
    wanted = dict(labels)

    def wants(event: api.SandboxEvent) -> bool:
        return (not types or event.type in types) and all(event.labels.get(k) == v for k, v in wanted.items())

    return wants


class SandboxEvents:
    """The event history of the cluster's sandboxes, followed from any cursor.

    A watch that starts behind the head writes a fence (`/microvm/event-fences/<instance>`) and is caught up when
    etcd delivers it: etcd 3.4 sends a catching-up watch nothing when its replay holds no change for it, and answers
    a progress request with its own head before the replay is out (etcd-io/etcd#15220), so neither silence nor a
    progress reply can say the backlog was sent."""

    def __init__(self, etcd, operator_tenants=("default",), instance_id: str = "gateway", lease=lambda: None) -> None:
        self.history = EtcdHistory(etcd)
        self.records = Records(etcd)
        self.operator_tenants = frozenset(operator_tenants)
        self.instance_id = instance_id
        self.lease = lease  # the replica's registration lease when there is one: its fence goes with it

    async def _fence(self) -> int:
        """Writes this replica's fence; its revision, newer than every change before it."""
        fence = event_pb2.EventFence(instance_id=self.instance_id)
        fence.time.FromNanoseconds(time.time_ns())
        if (lease := self.lease()) is not None:
            try:
                return await self.records.put(EVENT_FENCES, fence, self.instance_id, lease=lease)
            except aetcd.exceptions.ClientError as error:
                cause = error.__cause__
                if not isinstance(cause, grpc.aio.AioRpcError) or cause.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                # The registration's lease ran out and is being granted again: this fence goes without one (the
                # next is written under the new lease over it).
        return await self.records.put(EVENT_FENCES, fence, self.instance_id)

    async def follow(
        self, tenant: str | None, after: Cursor | None, wants: Callable[[api.SandboxEvent], bool]
    ) -> AsyncIterator[api.SandboxEvent | Progress]:
        """The events of `tenant`'s sandboxes (every tenant's: None) after `after` (None: from now) that `wants`,
        as they happen: first a Progress, then events, a Progress with `caught_up` once every event up to the
        cluster's head at the start was sent, and a Progress each time the position moved while nothing was sent
        for KEEPALIVE_SECONDS. OUT_OF_RANGE when `after` was compacted, meanwhile too."""
        head = await self.history.head()
        after = after or Cursor(head)
        if after.revision > head:
            raise InvalidArgument(
                f"cursor {after} is ahead of the cluster (revision {head}): not one this cluster issued",
                reason="BAD_CURSOR",
            )
        base = after.revision if after.index is None else after.revision - 1
        deriver = SandboxEventDeriver(tenant)
        try:
            await deriver.load(self.history, base)
            watch = await self.history.watch(*WATCHED, base)
        except Compacted:
            raise compacted(after) from None
        except FutureRevision:
            raise InvalidArgument(f"cursor {after} is ahead of the cluster", reason="BAD_CURSOR") from None
        loop = asyncio.get_running_loop()
        position, caught_up = after, base >= head
        sent = loop.time()
        try:
            if not caught_up:
                head = await self._fence()
            yield Progress(position, caught_up)
            while True:
                try:
                    batch = await watch.next(max(0.05, KEEPALIVE_SECONDS - (loop.time() - sent)))
                except Compacted:
                    raise compacted(position) from None
                if batch is None:
                    sent = loop.time()
                    yield Progress(position, caught_up)
                    continue
                if not batch.changes:  # etcd's progress notification: nothing more up to its revision
                    if batch.revision > position.revision:
                        position = Cursor(batch.revision)
                    continue
                for revision, changes in batch.revisions():
                    for index, derived in enumerate(deriver.apply(revision, changes)):
                        if revision == after.revision and after.index is not None and index <= after.index:
                            continue  # sent before the caller resumed
                        event = to_public(derived, revision, index)
                        if wants(event):
                            sent = loop.time()
                            yield event
                    position = Cursor(revision)
                    if not caught_up and revision >= head:
                        caught_up, sent = True, loop.time()
                        yield Progress(position, True)
        finally:
            await watch.close()

    def scope(self, requested: str) -> str | None:
        """The tenant whose events the caller may watch (None: every tenant's)."""
        principal = current_principal()
        if principal is None:  # no authentication (a private development box): any tenant, every one by default
            return None if requested in ("", EVERY_TENANT) else requested
        if requested in ("", principal.tenant):
            return principal.tenant
        if principal.role != auth_types.ROLE_ADMIN or principal.tenant not in self.operator_tenants:
            raise PermissionDenied(
                "watching another tenant's events is for the admins of the cluster's operator tenants "
                "(gateway.operator_tenants)",
                reason="NOT_AN_OPERATOR",
            )
        return None if requested == EVERY_TENANT else requested

    async def watch(self, request: api.WatchEventsRequest) -> AsyncIterator[api.WatchEventsResponse]:
        validate_labels(request.labels)
        wants = matcher(request.labels, check_types(request.types))
        after = Cursor.parse(request.cursor) if request.cursor else None
        async for item in self.follow(self.scope(request.tenant), after, wants):
            if isinstance(item, Progress):
                progress = api.WatchProgress(cursor=str(item.cursor), caught_up=item.caught_up)
                yield api.WatchEventsResponse(progress=progress)
            else:
                yield api.WatchEventsResponse(event=item)


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, events: SandboxEvents) -> None:
        self.events = events

    async def WatchEvents(self, request, context):
        async for response in self.events.watch(request):
            yield response
