"""tests/conftest.py: what a test timeout prints of the event loop's tasks."""

from __future__ import annotations

import asyncio

from tests.conftest import task_stack


async def waits_here(started: asyncio.Event) -> None:
    started.set()
    await asyncio.sleep(3600)  # the line the dump shows


async def test_a_waiting_task_is_shown_with_the_line_it_waits_on():
    started = asyncio.Event()
    waiting = asyncio.create_task(waits_here(started), name="the-waiter")
    await started.wait()
    shown = task_stack(waiting)
    waiting.cancel()
    assert "the-waiter" in shown and "in waits_here" in shown
    assert "await asyncio.sleep(3600)  # the line the dump shows" in shown
