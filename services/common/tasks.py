"""Small process and task helpers every service needs the same way."""

from __future__ import annotations

import asyncio
import os

import structlog

log = structlog.get_logger()


# How long a cancelled task may take to stop before it is cancelled again. Python 3.11's `asyncio.wait_for` (in our
# code and in libraries such as aetcd's watch setup) drops a cancellation that arrives as its inner call completes,
# and a task looping over it then runs on as if never cancelled.
RECANCEL_SECONDS = 1.0


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancels an owned background task and waits until it has stopped; whatever it raised is its own business
    (it was being stopped). A task that swallowed its cancellation is cancelled again each `RECANCEL_SECONDS`, so a
    shutdown never waits for it forever (relay test teardowns hung so until their 60 s timeout, twice in CI).

    A cancellation of the caller that arrives while it waits goes on up (`asyncio.wait` raises it): it is not the
    task's. One that arrived before the call was delivered already (a cancelled call's cleanup stopping its
    helpers), and the cleanup goes on."""
    if task is None:
        return
    task.cancel()
    while not (await asyncio.wait({task}, timeout=RECANCEL_SECONDS))[0]:
        log.warning("task_ignored_its_cancellation", task=task.get_name())
        task.cancel()
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would log it as never retrieved


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie does not: it is gone for every purpose of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
