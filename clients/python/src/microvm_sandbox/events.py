"""What happens to your sandboxes, as it happens (docs/events.md): created, started, paused, resumed, snapshotted,
deleted, failed, expired, node_lost (EventService.WatchEvents).

    async for event in client.events.watch(types=["created", "deleted"], labels={"team": "a"}):
        print(event.type, event.sandbox_id, event.cursor)     # keep event.cursor to resume after a restart

    stream = client.events.watch(since=saved_cursor, follow=False)  # what happened since, then stop
    missed = [event async for event in stream]

A stream that loses its connection (a gateway restarting) reconnects from the last cursor by itself: no event is
missed or repeated. `stream.cursor` is where it stands (also after progress messages without events).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import event_service_pb2 as events_api
from microvm.sandbox.v1 import event_service_pb2_grpc, sandbox_pb2
from microvm.types.v1 import event_pb2
from microvm_sandbox.errors import UnavailableError, from_rpc_error

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient

EVENT_TYPES = ("created", "started", "paused", "resumed", "snapshotted", "deleted", "failed", "expired", "node_lost")
RECONNECTS = 5


def event_type_number(kind: str | int) -> int:
    """`created`, `CREATED`, `SANDBOX_EVENT_TYPE_CREATED` or the number -> the number; ValueError for others."""
    if isinstance(kind, int):
        return kind
    name = kind.upper().replace("-", "_")
    name = name if name.startswith("SANDBOX_EVENT_TYPE_") else f"SANDBOX_EVENT_TYPE_{name}"
    try:
        return int(event_pb2.SandboxEventType.Value(name))
    except ValueError:
        raise ValueError(f"unknown event type {kind!r}; one of {', '.join(EVENT_TYPES)}") from None


def event_type_name(number: int) -> str:
    """The number -> `created`, `node_lost`, ..."""
    return str(event_pb2.SandboxEventType.Name(number)).removeprefix("SANDBOX_EVENT_TYPE_").lower()


@dataclass(frozen=True)
class SandboxEvent:
    """Something that happened to a sandbox. `type` is one of EVENT_TYPES; `cursor` resumes a watch after it;
    `state` is the sandbox's state right after (`"UNSPECIFIED"` once it is gone); `message` says why for failed and
    node_lost; `snapshot` names the snapshot of a snapshotted."""

    type: str
    sandbox: str
    cursor: str
    revision: int
    tenant: str
    labels: dict[str, str]
    template: str
    node: str
    state: str
    time: datetime.datetime
    message: str = ""
    snapshot: str = ""

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id (`sandbox` without `sandboxes/`)."""
        return self.sandbox.removeprefix("sandboxes/")

    @classmethod
    def of(cls, event: events_api.SandboxEvent) -> SandboxEvent:
        """From the API's message."""
        return cls(
            type=event_type_name(event.type),
            sandbox=event.sandbox,
            cursor=event.cursor,
            revision=event.revision,
            tenant=event.tenant,
            labels=dict(event.labels),
            template=event.template,
            node=event.node,
            state=sandbox_pb2.SandboxState.Name(event.state).removeprefix("SANDBOX_STATE_"),
            time=event.time.ToDatetime(tzinfo=datetime.UTC),
            message=event.message,
            snapshot=event.snapshot,
        )


class AsyncEventStream:
    """The events of one watch, as they come (`async for`). `cursor` is where it stands; `close()` stops it."""

    def __init__(self, client: AsyncClient, request: events_api.WatchEventsRequest, follow: bool) -> None:
        self.client, self.request, self.follow = client, request, follow
        self.cursor = request.cursor
        self._stub = event_service_pb2_grpc.EventServiceStub(client.channel)  # type: ignore[no-untyped-call]
        self._call: Any = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[SandboxEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[SandboxEvent]:
        failures = 0
        while not self._closed:
            request = events_api.WatchEventsRequest()
            request.CopyFrom(self.request)
            request.cursor = self.cursor
            self._call = self._stub.WatchEvents(request, metadata=self.client.metadata)
            try:
                async for response in self._call:
                    failures = 0
                    if response.HasField("progress"):
                        self.cursor = response.progress.cursor
                        if not self.follow and response.progress.caught_up:
                            return
                        continue
                    self.cursor = response.event.cursor
                    yield SandboxEvent.of(response.event)
                return
            except grpc.aio.AioRpcError as error:
                if self._closed or error.code() == grpc.StatusCode.CANCELLED:
                    return
                failure = from_rpc_error(error)
                failures += 1
                if not isinstance(failure, UnavailableError) or failures > RECONNECTS or not self.cursor:
                    raise failure from None
                await asyncio.sleep(0.2 * 2**failures)  # a gateway restarting: resume after the last cursor

    async def close(self) -> None:
        """Stops watching."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class AsyncEvents:
    """`client.events`: watch the lifecycle events of your tenant's sandboxes."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def watch(
        self,
        types: Iterable[str | int] = (),
        labels: Mapping[str, str] | None = None,
        since: str = "",
        follow: bool = True,
        tenant: str = "",
    ) -> AsyncEventStream:
        """Events of the sandboxes with every one of `labels`, of the kinds in `types` (default: all), after cursor
        `since` (default: from now); `follow=False` stops once what had happened when it began has come. `tenant`:
        another tenant's (`*`: every tenant's), for operators only."""
        request = events_api.WatchEventsRequest(labels=dict(labels or {}), cursor=since, tenant=tenant)
        request.types.extend(event_type_number(t) for t in types)
        return AsyncEventStream(self.client, request, follow)
