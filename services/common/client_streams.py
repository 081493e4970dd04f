"""Ending a client stream without making its caller's grpc report INTERNAL."""

from __future__ import annotations

import asyncio

from services.common.errors import ServiceError

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
    except (TimeoutError, ServiceError):
        pass
