"""A registration's keep-alive loop ends when it is cancelled, even when the cancel arrives just as a lease refresh
completes (services/common/registry.py). Python 3.11's `asyncio.wait_for` returned the refresh's result then and
dropped the cancellation: the loop ran on and `close()` waited until its own caller gave up."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.common.registry import ServiceInstance, ServiceRegistration

pytestmark = pytest.mark.timeout(20)


class Lease:
    """A lease whose refresh answers when the test says."""

    def __init__(self) -> None:
        self.pending: asyncio.Future | None = None
        self.refreshing = asyncio.Event()

    async def refresh(self):
        self.pending = asyncio.get_running_loop().create_future()
        self.refreshing.set()
        return await self.pending


async def test_a_cancel_as_the_refresh_completes_stops_the_keep_alive():
    registration = ServiceRegistration(client=None, instance=ServiceInstance("gateway", "gw-1", ""), ttl=1)
    lease = Lease()
    registration._lease = lease
    keep_alive = asyncio.create_task(registration._keep_alive())
    await lease.refreshing.wait()
    lease.pending.set_result(SimpleNamespace(TTL=1))  # the refresh completes...
    keep_alive.cancel()  # ...and the cancel comes in the same turn
    await asyncio.wait({keep_alive}, timeout=2)
    assert keep_alive.done(), "the keep-alive went on after it was cancelled"
    assert keep_alive.cancelled()
