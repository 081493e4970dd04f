"""Chaos (`make chaos`, not part of `make test`): a real local stack under mixed load while each of its processes is
killed with SIGKILL in turn (gateway, auth, compute, relay, network, snapshot, etcd), the supervisor restarts it,
and the load goes on. Nothing acknowledged may be lost, no stream may end without its status, no call may answer
INTERNAL/UNKNOWN; UNAVAILABLE and DEADLINE_EXCEEDED while a process is down are expected, retried and counted.

MVM_CHAOS_SECONDS (default 180): how long the load runs (at least one kill of every process);
MVM_CHAOS_KILL_EVERY (default 12): seconds between kills; MVM_CHAOS_VMM (default fake): `auto`/`qemu` to run real
guests (images built by `make images`); MVM_CHAOS_WORKERS (default 4): concurrent clients.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.load import Workload, running_stack
from tests.supervised import VICTIMS, kill_and_wait, supervised_restarts, wait_serving
from tests.tally import Tally

pytestmark = pytest.mark.chaos


async def test_chaos_each_process_killed_in_turn_loses_nothing():
    seconds = float(os.environ.get("MVM_CHAOS_SECONDS", "180"))
    kill_every = float(os.environ.get("MVM_CHAOS_KILL_EVERY", "12"))
    async with running_stack(os.environ.get("MVM_CHAOS_VMM", "fake")) as stack:
        tally = Tally()
        load = Workload(stack, tally, workers=int(os.environ.get("MVM_CHAOS_WORKERS", "4")))
        stop = asyncio.Event()
        clients = asyncio.create_task(load.run(stop))
        started = time.monotonic()
        await asyncio.sleep(5)  # every client has its first sandboxes before the first kill
        kills = 0
        while kills < len(VICTIMS) or time.monotonic() - started < seconds:
            if clients.done():
                clients.result()  # a client died of something other than a status: raise it
            victim = VICTIMS[kills % len(VICTIMS)]
            load.window_open()
            kill_at = time.monotonic()
            tally.kills.append({"at": tally.now(), **await kill_and_wait(stack, victim)})
            load.window_close()
            kills += 1
            await asyncio.sleep(max(0.0, kill_at + kill_every - time.monotonic()))
        stop.set()
        await clients
        assert await wait_serving(stack), stack.health()
        await load.verify()
        await load.cleanup()
        print(
            "\nCHAOS "
            + tally.as_json(
                suite="chaos",
                seconds=round(time.monotonic() - started),
                workers=load.workers,
                cycles=load.cycles,
                restarts=supervised_restarts(stack),
            ),
            flush=True,
        )
        assert tally.losses == dict.fromkeys(tally.losses, 0), tally.findings
