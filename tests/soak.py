"""Resources of a running stack over time, for the soak suite (tests/standing/test_soak.py): what each process of
the stack holds (RSS, open file descriptors), the TAP devices of the host, the keys in etcd and the VM directories
of compute, sampled every few seconds while tests/load.py's workload runs; then a least-squares slope per metric
over the second half of the run, which must be flat.

Tolerances (per minute of load; the load makes ~150 cycles of ~9 calls a minute on 2 cores):
- RSS of a service: < 1 MiB/min. A leak of ~1 KiB per call would be several MiB/min. The RSS of a Python service
  moves in steps of up to ~3 MiB at a constant live state, so a fitted growth of less than RSS_STEP_MIB over the
  window passes whatever its slope: a 3-minute run (1.5-minute window) resolves ~2.7 MiB/min, the default
  10-minute run the full 1 MiB/min.
- open fds of a process, VM directories, etcd keys (without the audit log): < 1, 0.5, 2 a minute, where one leaked
  per cycle would be ~150 a minute; and after the load stops and cleans up, the count is the one before it began
  (measured the same way: quiet, after a warm-up that opened the channels a service keeps).
- TAP devices: networking is off in test stacks: none, ever (sampled still, so a leak in that path shows).
- Reported, not bounded: etcd's RSS and the audit events (/microvm/auth/audit/, one per call, append-only). Both
  grow by design today: the stack's etcd runs without auto-compaction, so it keeps every revision of every key,
  and the audit log has no retention.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.network.links import TAP_PREFIX
from tests.load import Workload
from tests.stack import LocalStack
from tests.supervised import supervised_pids
from tests.tally import Tally

AUDIT_PREFIX = b"/microvm/auth/audit/"
# Kept for a day by design (what became of a deleted sandbox): counted with the audit log, not as a leak.
RETAINED_PREFIXES = (AUDIT_PREFIX, b"/microvm/sandbox-tombstones/")
# Per minute; matched on the metric's suffix (process metrics are "<process>.<suffix>").
SLOPE_LIMITS = {"rss_mib": 1.0, "fds": 1.0, "etcd_keys": 2.0, "vm_dirs": 0.5, "taps": 0.0}
UNBOUNDED = ("etcd.rss_mib", "audit_events")
# A Python service's RSS moves in steps of up to ~3 MiB at a constant live state (arenas, gRPC buffers; measured
# here under this load): a fitted growth within one step over the window is noise, not a slope.
RSS_STEP_MIB = 4.0
# Counts that must come back to where they were once the load is gone.
RETURNS_TO_BASELINE = ("fds", "etcd_keys", "vm_dirs", "taps")


def process_resources(pid: int) -> tuple[float, int]:
    """RSS in MiB and the number of open file descriptors of `pid`."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> collections.Counter:
    """What `pid`'s open file descriptors are, counted by kind: a file by its path, a socket, a pipe or an anonymous
    inode by kind only (their inode numbers change with every connection)."""
    kinds: collections.Counter = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed between the listing and the link
            continue
        kinds[re.sub(r"[:\[]\[?\d+\]$", "", target)] += 1
    return kinds


def fd_changes(before: dict[str, collections.Counter], after: dict[str, collections.Counter]) -> dict[str, dict]:
    """Per process, the kinds of descriptor whose count differs between two readings: kind -> (before, after)."""
    changes = {}
    for name in sorted({*before, *after}):
        old, new = before.get(name, collections.Counter()), after.get(name, collections.Counter())
        differing = {kind: (old[kind], new[kind]) for kind in sorted({*old, *new}) if old[kind] != new[kind]}
        if differing:
            changes[name] = differing
    return changes


async def all_fd_kinds(stack: LocalStack) -> dict[str, collections.Counter]:
    kinds = {}
    for name, pid in supervised_pids(stack).items():
        try:
            kinds[name] = await asyncio.to_thread(fd_kinds, pid)
        except OSError:
            continue
    return kinds


def tap_devices() -> list[str]:
    """This installation's TAP devices on the host (`ip -o link`, names with the network service's prefix)."""
    lines = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in lines if line.count(":") >= 2]
    return [name for name in names if name.startswith(TAP_PREFIX)]


def vm_directories(stack: LocalStack) -> int:
    root = stack.state_dir / "compute" / "vms"
    return sum(1 for entry in root.iterdir() if entry.is_dir()) if root.exists() else 0


async def etcd_key_counts(stack: LocalStack) -> tuple[int, int]:
    """Keys under /microvm/ apart from the audit log and tombstones, and those (retained by design)."""
    client = stack.etcd_client()
    await client.connect()
    try:
        keys = [kv.key for kv in await client.get_prefix(b"/microvm/", keys_only=True)]
    finally:
        await client.close()
    retained = sum(1 for key in keys if key.startswith(RETAINED_PREFIXES))
    return len(keys) - retained, retained


async def sample(stack: LocalStack) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, pid in supervised_pids(stack).items():
        try:
            values[f"{name}.rss_mib"], values[f"{name}.fds"] = await asyncio.to_thread(process_resources, pid)
        except OSError:  # it died between the state file and /proc: no sample of it this time
            continue
    values["taps"] = len(await asyncio.to_thread(tap_devices))
    values["etcd_keys"], values["audit_events"] = await etcd_key_counts(stack)
    values["vm_dirs"] = vm_directories(stack)
    return values


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def limit_for(metric: str) -> float | None:
    if metric in UNBOUNDED:
        return None
    return SLOPE_LIMITS.get(metric.rpartition(".")[2])


@dataclass
class Samples:
    """Samples of a run: (seconds since its start, values)."""

    taken: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    async def run(self, stack: LocalStack, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.taken.append((time.monotonic() - self.started, await sample(stack)))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    def slopes(self) -> dict[str, float]:
        """Per metric, the slope over the second half of the run (the first half is warm-up)."""
        if not self.taken:
            return {}
        half = self.taken[-1][0] / 2
        later = [(at, values) for at, values in self.taken if at >= half]
        metrics = sorted({metric for _, values in later for metric in values})
        return {
            metric: round(slope_per_minute([(at, values[metric]) for at, values in later if metric in values]), 3)
            for metric in metrics
        }

    def window_minutes(self) -> float:
        """How long the fitted second half lasts."""
        return self.taken[-1][0] / 2 / 60 if self.taken else 0.0

    def too_steep(self) -> dict[str, float]:
        """Metrics whose slope exceeds their limit (a positive slope: a shrinking count is no leak); an RSS only
        when its fitted growth over the window is also more than one allocator step (RSS_STEP_MIB)."""
        window = self.window_minutes()
        return {
            metric: value
            for metric, value in self.slopes().items()
            if (limit := limit_for(metric)) is not None
            and value > limit
            and not (metric.endswith(".rss_mib") and value * window <= RSS_STEP_MIB)
        }


async def quiet_sample(
    stack: LocalStack, settle: float = 3.0, timeout: float = 60.0
) -> tuple[dict[str, float], dict[str, collections.Counter]]:
    """A sample once the counts that must return to baseline have stayed the same for `settle` seconds, and what
    each process's descriptors were then (to say which kind did not come back)."""
    deadline = time.monotonic() + timeout
    previous = await sample(stack)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        current = await sample(stack)
        if counts(current) != counts(previous):
            previous, stable_since = current, time.monotonic()
        elif time.monotonic() - stable_since >= settle:
            break
    return previous, await all_fd_kinds(stack)


def counts(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k.rpartition(".")[2] in RETURNS_TO_BASELINE}


def not_returned(baseline: dict[str, float], end: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Counts that did not come back to their baseline: metric -> (baseline, end)."""
    before, after = counts(baseline), counts(end)
    return {k: (before.get(k), after.get(k)) for k in sorted({*before, *after}) if after.get(k) != before.get(k)}


@dataclass
class SoakResult:
    tally: Tally
    samples: Samples
    baseline: dict[str, float]
    end: dict[str, float]
    cycles: int
    baseline_fds: dict[str, collections.Counter] = field(default_factory=dict)
    end_fds: dict[str, collections.Counter] = field(default_factory=dict)

    @property
    def too_steep(self) -> dict[str, float]:
        return self.samples.too_steep()

    @property
    def not_returned(self) -> dict[str, tuple[float, float]]:
        return not_returned(self.baseline, self.end)

    @property
    def fd_changes(self) -> dict[str, dict]:
        """Which kinds of descriptor differ between the quiet baseline and the quiet end, per process."""
        return fd_changes(self.baseline_fds, self.end_fds)

    def as_json(self, **extra) -> str:
        return json.dumps(
            {
                **extra,
                "cycles": self.cycles,
                "samples": len(self.samples.taken),
                "slopes_per_minute": self.samples.slopes(),
                "too_steep": self.too_steep,
                "baseline": counts(self.baseline),
                "end": counts(self.end),
                "not_returned": self.not_returned,
                "fd_changes": self.fd_changes,
                "tally": json.loads(self.tally.as_json()),
            }
        )


async def run_soak(stack: LocalStack, seconds: float, every: float, warmup: float, workers: int = 4) -> SoakResult:
    """`warmup` seconds of load (channels opened, caches filled), cleaned up, a quiet baseline; then `seconds` of
    load sampled every `every` seconds; then everything checked, cleaned up, and a quiet end sample."""
    tally = Tally()
    stop = asyncio.Event()
    warm = Workload(stack, tally, workers=workers)
    await _run_for(warm.run(stop), stop, warmup)
    await warm.cleanup()
    baseline, baseline_fds = await quiet_sample(stack)

    load = Workload(stack, tally, workers=workers)
    samples, stop = Samples(), asyncio.Event()
    sampler = asyncio.create_task(samples.run(stack, every, stop))
    await _run_for(load.run(stop), stop, seconds)
    await sampler
    await load.verify()
    await load.cleanup()
    end, end_fds = await quiet_sample(stack)
    return SoakResult(tally, samples, baseline, end, warm.cycles + load.cycles, baseline_fds, end_fds)


async def _run_for(work, stop: asyncio.Event, seconds: float) -> None:
    task = asyncio.ensure_future(work)
    await asyncio.wait([task], timeout=seconds)
    stop.set()
    await task  # raises what ended it early
