"""A node's snapshot copies over time: those no record and no VM needs any more go, and so do the share helpers and
work directories a crash of compute left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import structlog

from services.compute.snapshots import VmSnapshots

log = structlog.get_logger()


def reap_leftover_helpers(snapshots: VmSnapshots) -> int:
    """Share helpers a crash of compute left running (a qemu that never runs a guest, holding a RAM file as
    large as the guest's): killed, their work directories removed; returns how many were running. At start,
    before anything can start a new one."""
    killed = 0
    for work in sorted(snapshots.root.glob(".*.share")) if snapshots.root.exists() else []:
        try:
            pid = int(snapshots.driver.paths(work)["pid"].read_text())
            if snapshots.driver.owns_process(pid, work):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            pass  # never started, or gone already
        shutil.rmtree(work, ignore_errors=True)
    if killed:
        log.warning("share_helpers_reaped", count=killed)
    return killed


async def prune(snapshots: VmSnapshots, live_snapshots: set[str], min_age_seconds: float = 0.0) -> list[str]:
    """Drops local snapshot copies that no record (`live_snapshots`) and no VM needs any more, and work
    directories a crash left behind; returns what went. Only what is older than `min_age_seconds`: a snapshot
    just frozen has no record until the gateway commits it (work directories get 6 times as long: an upload
    may still be writing)."""
    dropped = []
    for directory in sorted(snapshots.root.iterdir()) if snapshots.root.exists() else []:
        name = directory.name
        try:
            age = time.time() - directory.stat().st_mtime
        except FileNotFoundError:
            continue
        if name in live_snapshots or age < min_age_seconds * (6 if name.startswith(".") else 1):
            continue
        async with snapshots.ledger.lock(f"snapshot:{name}"):
            if any(vm.source_snapshot == name for vm in snapshots.ledger.vms.values()):
                continue
            await asyncio.to_thread(shutil.rmtree, directory, True)
        snapshots.restores.pop(name, None)
        snapshots.unshareable.discard(name)
        dropped.append(name)
    return dropped
