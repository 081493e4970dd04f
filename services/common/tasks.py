"""Small process and task helpers every service needs the same way."""

from __future__ import annotations

import asyncio
import os


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancels an owned background task and waits until it has stopped; whatever it raised is its own business
    (it was being stopped). A cancellation of the caller itself that arrives while it waits is not that task's: it goes
    on up. Swallowing it once let a relay's VM watch, cancelled while it closed a removed VM's channel, carry on
    watching, and the shutdown that cancelled it waited for it forever. One that arrived before the call (a cancelled
    call's cleanup stopping its helpers) was delivered already, and the cleanup goes on."""
    if task is None:
        return
    caller = asyncio.current_task()
    cancels_before = caller.cancelling() if caller is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if caller is not None and caller.cancelling() > cancels_before:
            raise
    except Exception:
        pass


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
