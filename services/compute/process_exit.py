"""Waiting for a VMM process to be gone (it need not be our child: VMMs are daemonized)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


async def exited(pid: int, seconds: float = 120.0) -> None:
    """Waits until process `pid` is gone: a stopped VMM holds its disk's lock until it has exited (a large guest's
    memory takes a while to free), and the next builder VM opens that disk as its backing file."""
    deadline = time.monotonic() + seconds
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited; only its parent's wait is left
        except (OSError, IndexError):
            return
        await asyncio.sleep(0.05)
