"""Ending a client stream without making its caller's grpc report INTERNAL.

grpc's asyncio client reports INTERNAL ("Internal error from Core") instead of the server's status when the server
ends a client stream while one of the client's writes is still in flight (grpc/grpc#36066): a write blocked by flow
control is in flight as long as the server does not read. So a server that refuses a client stream (`refuse`, run
by the error interceptor for every client-streaming call that fails) says so at once in its initial metadata
(`mvm-refused`) and reads what the caller still sends until the caller half-closes; a caller that watches for it
(the gateway forwarding to a relay, the HTTP door, the SDK: `send_until_refused`) stops sending and half-closes at
once, and any other caller gets the status after its last message. Bounding that read by a total time (2 s, as
before) cut off every caller whose upload took longer: `mvm cp` of 8 MB or more onto a directory answered INTERNAL.
The gateway's door refuses a bidirectional stream it does not admit (no credential, rate limit) the same way, but
stops waiting after 1 s of silence: an unauthenticated BuildTemplate with its context in flight answered INTERNAL,
and an ExecInteractive caller that waits for output before it types must not wait long for its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

# Initial metadata a server sends when it refused a client stream it has not finished reading.
REFUSED_KEY = "mvm-refused"
# A refused caller that sends nothing for this long is not waited for any more.
IDLE_SECONDS = 10.0
# The same for a bidirectional stream refused at the gateway's door (BuildTemplate sending its context): its caller
# may be one that waits for an answer before it sends more (ExecInteractive), which a long wait would hold up.
BIDI_IDLE_SECONDS = 1.0

# How long a client stream that ends is still read, so that what its caller already sent is taken first.
DRAIN_SECONDS = 2.0


async def drain(requests, seconds: float = DRAIN_SECONDS) -> None:
    """Reads and drops what the caller still sends on a client stream about to end, until it half-closes or for
    `seconds`. A call that ends while its caller's write is in flight is reported by grpc's asyncio client as
    INTERNAL ("Internal error from Core") instead of with the status it ended with (grpc/grpc#36066): the gateway,
    forwarding a WriteFile or ExecInteractive here, is such a caller, and would pass that INTERNAL on."""

    async def read_all() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(read_all(), seconds)
    except Exception:
        pass


async def drain_until_closed(requests, idle_seconds: float = IDLE_SECONDS) -> None:
    """Reads and drops what the caller still sends until it half-closes (or sends nothing for `idle_seconds`)."""
    iterator = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                await anext(iterator)
        except Exception:  # StopAsyncIteration (half-closed), TimeoutError (idle), a bad message: the end
            return


async def refuse(context, requests, idle_seconds: float = IDLE_SECONDS) -> None:
    """The call failed while its caller may still be sending: tell it (initial metadata `mvm-refused`; refused
    before any answer, so the metadata is not sent yet), then take what it sends until it half-closes."""
    try:
        await context.send_initial_metadata(((REFUSED_KEY, "1"),))
    except Exception:
        pass  # a stream that already answered: its caller learns at the end
    await drain_until_closed(requests, idle_seconds)


def refused(metadata) -> bool:
    return any(key == REFUSED_KEY for key, _ in (metadata or ()))


async def send_until_refused(start: Callable[[AsyncIterator[Any]], Any], messages: AsyncIterator[Any]) -> Any:
    """The reply of the client-streaming call `start(requests)`, sending `messages` until they end or the server says
    it refused the call (then half-closing at once, so its status arrives with no write in flight)."""
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        async for message in messages:
            if stop.is_set():
                return
            yield message

    call = start(requests())

    async def watch() -> None:
        try:
            if refused(await call.initial_metadata()):
                stop.set()
        except Exception:
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        return await call
    finally:
        watcher.cancel()


async def lead_message(requests, part: str, call: str, reason: str):
    """(the first message's `part`, an iterator over the rest) of a stream whose first message must carry `part`
    (a header or spec, the data after it); INVALID_ARGUMENT with `reason` otherwise."""
    from services.common.errors import InvalidArgument  # errors imports this module

    iterator = aiter(requests)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        raise InvalidArgument(f"{call} needs a first message with the {part}", reason=reason) from None
    if first.WhichOneof(first.DESCRIPTOR.oneofs[0].name) != part:
        raise InvalidArgument(f"the first {call} message must carry the {part}", reason=reason)
    return getattr(first, part), iterator
