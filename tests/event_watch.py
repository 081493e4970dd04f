"""A WatchEvents stream read in the background, for tests: its events and progress messages queue up as they come."""

from __future__ import annotations

import asyncio

import grpc

from microvm.sandbox.v1 import event_service_pb2 as events_api
from microvm.sandbox.v1 import event_service_pb2_grpc
from microvm.types.v1 import event_pb2

CREATED = event_pb2.SANDBOX_EVENT_TYPE_CREATED
STARTED = event_pb2.SANDBOX_EVENT_TYPE_STARTED
PAUSED = event_pb2.SANDBOX_EVENT_TYPE_PAUSED
RESUMED = event_pb2.SANDBOX_EVENT_TYPE_RESUMED
SNAPSHOTTED = event_pb2.SANDBOX_EVENT_TYPE_SNAPSHOTTED
DELETED = event_pb2.SANDBOX_EVENT_TYPE_DELETED
FAILED = event_pb2.SANDBOX_EVENT_TYPE_FAILED
EXPIRED = event_pb2.SANDBOX_EVENT_TYPE_EXPIRED
NODE_LOST = event_pb2.SANDBOX_EVENT_TYPE_NODE_LOST


def kind(event) -> str:
    return event_pb2.SandboxEventType.Name(event.type).removeprefix("SANDBOX_EVENT_TYPE_")


class EventWatch:
    """`async with EventWatch(caller, ...)`: the stream is in place (its first progress read) once entered."""

    def __init__(self, caller, **request) -> None:
        self.stub = event_service_pb2_grpc.EventServiceStub(caller.channel)
        self.metadata = caller.metadata
        self.request = events_api.WatchEventsRequest(**request)
        self.items: asyncio.Queue = asyncio.Queue()
        self.first: events_api.WatchProgress | None = None
        self.call = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> EventWatch:
        self.call = self.stub.WatchEvents(self.request, metadata=self.metadata)
        first = await asyncio.wait_for(self.call.read(), 30)
        assert first.HasField("progress"), first
        self.first = first.progress
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                self.items.put_nowait(response)
        except grpc.aio.AioRpcError as error:
            self.items.put_nowait(error)

    async def next(self, timeout: float = 30):
        """The next message (an event or a progress); raises the error that ended the stream."""
        item = await asyncio.wait_for(self.items.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def event(self, timeout: float = 30):
        while True:
            item = await self.next(timeout)
            if item.HasField("event"):
                return item.event

    async def events_until(self, sandbox: str, kind_: int, timeout: float = 60) -> list:
        """Every event up to `sandbox`'s first of `kind_`, that one included."""
        seen = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.event(max(0.1, deadline - loop.time()))
            seen.append(event)
            if event.sandbox == sandbox and event.type == kind_:
                return seen

    async def quiet(self, seconds: float) -> list:
        """The events that come within `seconds` (progress messages left out)."""
        found = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                found.append(await self.event(left))
            except TimeoutError:
                break
        return found

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aexit__(self, *exc) -> None:
        await self.close()
