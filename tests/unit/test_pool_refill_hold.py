"""A pool refill waits `compute.pool_refill_delay_ms` after a claim while the pool still has a VM ready (the
claimed sandbox's first commands get the CPU), and not at all once a burst has emptied it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.common.config import ConfigError
from services.common.settings import ComputeSettings
from services.compute.warm_pool import WarmStart

HOUR_MS = 3_600_000


def warm_start(delay_ms: int) -> WarmStart:
    lifecycle = SimpleNamespace(settings=SimpleNamespace(pool_refill_delay_ms=delay_ms))
    return WarmStart(lifecycle, snapshots=None, templates=None)


async def test_a_refill_right_after_a_claim_waits_while_a_vm_is_ready():
    warm = warm_start(HOUR_MS)
    warm.pool["default"] = ["pool-ready"]
    warm._claimed_at["default"] = time.monotonic()
    held = asyncio.create_task(warm._after_claim("default"))
    await asyncio.sleep(0.05)
    assert not held.done()
    # A burst takes the last ready VM: the refill goes at once.
    warm.pool["default"] = []
    warm._claimed_at["default"] = time.monotonic()
    warm._claimed.set()
    await asyncio.wait_for(held, 5)


async def test_no_wait_without_a_recent_claim_or_with_the_hold_off():
    warm = warm_start(HOUR_MS)
    warm.pool["default"] = ["pool-ready"]
    await asyncio.wait_for(warm._after_claim("default"), 5)  # never claimed
    warm._claimed_at["default"] = time.monotonic() - 2 * HOUR_MS / 1000
    await asyncio.wait_for(warm._after_claim("default"), 5)  # long ago
    off = warm_start(0)
    off.pool["default"] = ["pool-ready"]
    off._claimed_at["default"] = time.monotonic()
    await asyncio.wait_for(off._after_claim("default"), 5)


def test_the_setting_is_bounded():
    with pytest.raises(ConfigError, match="pool_refill_delay_ms"):
        ComputeSettings(pool_refill_delay_ms=-1).validate()
