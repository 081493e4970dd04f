"""A quiet build stream still says something: a keepalive after each quiet interval, the events in order, and the
follower closed when the caller stops."""

from __future__ import annotations

import asyncio

from microvm.sandbox.v1 import template_service_pb2 as api
from services.gateway.build_watch import with_keepalives


async def test_quiet_intervals_get_keepalives_and_events_keep_their_order():
    closed = asyncio.Event()

    async def events():
        try:
            yield api.BuildTemplateResponse(log=api.BuildLog(step=0, data=b"a"))
            await asyncio.sleep(0.35)
            yield api.BuildTemplateResponse(log=api.BuildLog(step=0, data=b"b"))
        finally:
            closed.set()

    seen = [e.WhichOneof("event") async for e in with_keepalives(events(), api.BuildTemplateResponse, seconds=0.1)]
    assert seen[0] == "log" and seen[-1] == "log"
    assert 2 <= seen.count("keepalive") <= 4
    assert closed.is_set()


async def test_a_caller_that_stops_closes_the_follower():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                await asyncio.sleep(10)
                yield api.BuildTemplateResponse()
        finally:
            closed.set()

    stream = with_keepalives(endless(), api.BuildTemplateResponse, seconds=0.05)
    first = await anext(stream)
    assert first.WhichOneof("event") == "keepalive"
    await stream.aclose()
    assert closed.is_set()
