"""The children of a test stack's supervisor (etcd and every service): their pids and restarts from its state file
(`<state_dir>/supervisor.json`), and killing one to wait until the supervisor restarted it and the stack serves."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from services.supervisor.stack import SERVICE_KINDS
from tests.stack import LocalStack

VICTIMS = (*SERVICE_KINDS, "etcd")


def supervised_pids(stack: LocalStack) -> dict[str, int]:
    """Pid of each child of the stack's supervisor (etcd and the services), from its state file."""
    children = json.loads((stack.state_dir / "supervisor.json").read_text())
    return {name: entry["pid"] for name, entry in children.items() if entry.get("pid")}


def supervised_restarts(stack: LocalStack) -> dict[str, int]:
    children = json.loads((stack.state_dir / "supervisor.json").read_text())
    return {name: entry.get("restarts", 0) for name, entry in children.items()}


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_serving(stack: LocalStack, timeout: float = 60.0) -> bool:
    """Whether every service reports SERVING (which also needs etcd) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = await asyncio.to_thread(stack.health)
        if all(report.get(kind) == "SERVING" for kind in stack.kinds):
            return True
        await asyncio.sleep(0.2)
    return False


async def kill_and_wait(stack: LocalStack, victim: str, timeout: float = 60.0) -> dict:
    """SIGKILL of one child of the supervisor; returns once the supervisor runs a new one and every service serves
    again, with how long that took."""
    old = supervised_pids(stack)[victim]
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    deadline = killed_at + timeout
    while time.monotonic() < deadline:
        new = supervised_pids(stack).get(victim)
        if new and new != old and pid_alive(new):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the supervisor did not restart {victim} in {timeout}s")
    if not await wait_serving(stack, deadline - time.monotonic()):
        raise AssertionError(f"the stack did not serve again {timeout}s after {victim} was killed: {stack.health()}")
    return {"victim": victim, "recovered_seconds": round(time.monotonic() - killed_at, 2)}
