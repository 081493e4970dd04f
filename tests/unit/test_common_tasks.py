"""services/common/tasks.py: stopping an owned task, and a cancellation that belongs to the one stopping it."""

from __future__ import annotations

import asyncio

import pytest

from services.common.tasks import cancel_and_wait

pytestmark = pytest.mark.timeout(10)


async def slow_to_stop(stopping: asyncio.Event) -> None:
    """A task whose cancellation takes a few loop turns (a channel's heartbeat closing its side)."""
    try:
        await asyncio.sleep(3600)
    finally:
        stopping.set()
        await asyncio.sleep(0.05)


async def test_what_the_stopped_task_raised_stays_with_it():
    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("its own business")

    failing = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    await cancel_and_wait(failing)
    stopping = asyncio.Event()
    sleeping = asyncio.create_task(slow_to_stop(stopping))
    await asyncio.sleep(0)
    await cancel_and_wait(sleeping)
    assert sleeping.cancelled() and stopping.is_set()
    await cancel_and_wait(None)


async def test_a_watch_cancelled_while_it_stops_a_task_stops_too():
    """The relay's VM watch closes a removed VM's channel (stopping the channel's tasks) inside its loop. Cancelled
    right then, it must end: a cancellation swallowed there kept it watching, and its owner's close waited forever."""
    stopping, iterations, gave_up = asyncio.Event(), 0, False

    async def watch() -> None:
        nonlocal iterations
        while not gave_up:
            iterations += 1
            inner = asyncio.create_task(slow_to_stop(stopping))
            await asyncio.sleep(0)
            await cancel_and_wait(inner)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await stopping.wait()  # the watch now waits for its inner task to finish stopping
    watcher.cancel()
    await asyncio.wait({watcher}, timeout=2)
    gave_up = True  # a watch that swallowed its cancellation ends here, so the failure below is reported
    assert watcher.done() and watcher.cancelled(), "the watch carried on after it was cancelled"
    assert iterations == 1


async def test_a_cancelled_calls_cleanup_stops_its_helpers_and_goes_on():
    """A call cancelled before its cleanup (a gRPC handler the server cancelled, in its `finally`): stopping a helper
    there must not end the cleanup, whose later steps (closing a stream, freeing a slot) still have to run."""
    stopping, cleaned = asyncio.Event(), []

    async def handler() -> None:
        helper = asyncio.create_task(slow_to_stop(stopping))
        try:
            await asyncio.sleep(3600)
        finally:
            await cancel_and_wait(helper)
            cleaned.append("after the helper")

    call = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.wait({call}, timeout=2)
    assert call.cancelled() and cleaned == ["after the helper"]


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again():
    """Python 3.11's `asyncio.wait_for` returns its inner result when a cancellation arrives just as that result
    does, and drops the cancellation: a loop over it runs on. Stopping such a task must still end."""
    results: asyncio.Queue[asyncio.Future] = asyncio.Queue()

    async def loop_over_wait_for() -> None:
        while True:
            result = asyncio.get_running_loop().create_future()
            results.put_nowait(result)
            await asyncio.wait_for(result, 3600)

    looping = asyncio.create_task(loop_over_wait_for())
    (await results.get()).set_result(None)
    stopping = asyncio.create_task(cancel_and_wait(looping))  # its cancel arrives with that result: dropped
    await results.get()  # the loop went round
    await asyncio.wait({stopping}, timeout=5)
    assert stopping.done() and looping.cancelled()
