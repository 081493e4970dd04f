"""Following a build: live from the replica running it (BuildFeed: every event, in order, to any number of
followers, each at its own pace), or from its record in etcd when another replica runs it or it has ended (the
record's state and steps as they change, then the end of its log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.types.v1 import template_pb2
from services.gateway.template_store import RUNNING_BUILDS, build_view, step_view

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
# A follower that falls this far behind a live feed gets the rest from the record instead.
MAX_EVENTS = 10_000


class BuildFeed:
    def __init__(self) -> None:
        self.events: list[api.BuildTemplateResponse] = []
        self.first = 0  # index of events[0] among all events (old ones are dropped past MAX_EVENTS)
        self.closed = False
        self._changed = asyncio.Condition()

    def emit(self, event: api.BuildTemplateResponse) -> None:
        self.events.append(event)
        if len(self.events) > MAX_EVENTS:
            dropped = len(self.events) - MAX_EVENTS
            del self.events[:dropped]
            self.first += dropped
        asyncio.ensure_future(self._notify())

    def close(self) -> None:
        self.closed = True
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def follow(self) -> AsyncIterator[api.BuildTemplateResponse]:
        """Every event from the first one kept, then each new one, until the build ends."""
        position = self.first
        while True:
            async with self._changed:
                while position - self.first >= len(self.events) and not self.closed:
                    await self._changed.wait()
                position = max(position, self.first)
                pending = self.events[position - self.first :]
                done = self.closed
            for event in pending:
                yield event
            position += len(pending)
            if done and position - self.first >= len(self.events):
                return


async def with_keepalives(events: AsyncIterator, response, seconds: float = KEEPALIVE_SECONDS) -> AsyncIterator:
    """`events`, with a keepalive `response` after every `seconds` without one (a quiet step can run for minutes,
    and proxies cut streams that say nothing)."""
    iterator = aiter(events)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait([pending], timeout=seconds)
            if not done:
                yield response(keepalive=api.BuildKeepalive())
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        pending.cancel()
        try:
            await pending
        except (asyncio.CancelledError, StopAsyncIteration, Exception):
            pass  # what the follower would have said next is of no use any more
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


async def follow_record(
    load: Callable[[], asyncio.Future], response=api.BuildTemplateResponse
) -> AsyncIterator[api.BuildTemplateResponse]:
    """A build's events as its record changes (polled): the build, each step that changed, and the build when it
    ends with the end of its log. `load()` returns the record (raises NOT_FOUND when it goes)."""
    build: template_pb2.TemplateBuildRecord = await load()
    if build.state in RUNNING_BUILDS:
        yield response(build=build_view(build))
    seen = [step.state for step in build.steps]
    while build.state in RUNNING_BUILDS:
        await asyncio.sleep(POLL_SECONDS)
        build = await load()
        for index, step in enumerate(build.steps):
            if index >= len(seen) or seen[index] != step.state:
                yield response(step=step_view(index, step))
        seen = [step.state for step in build.steps]
    if build.log_tail:
        yield response(log=api.BuildLog(step=len(build.steps), data=build.log_tail))
    yield response(build=build_view(build))
