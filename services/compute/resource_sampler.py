"""What each VM on this node uses, sampled every `usage_sample_seconds` from the host side and kept for an hour.

- CPU: the VMM process's user + system time (/proc/<pid>/stat); the percentage is of one host core since the
  previous sample, so a busy 2-vCPU guest can show 200.
- Memory: the VMM process's proportional set size (/proc/<pid>/smaps_rollup), against the guest's memory size.
- Disk: the blocks the VM's own files hold on the host (its copy-on-write disk, not the shared base image).
- Network: the TAP device's counters, turned round: what the TAP receives the guest sent.
- The guest's own view of its memory (MemTotal - MemAvailable), from a ping of its agent through the relay. A
  guest that used less than QUIET_PERCENT of a core since the previous sample keeps its last view, refreshed at
  least every GUEST_VIEW_MAX_AGE seconds: under TCG each ping took about 9 ms of an idle guest's CPU, half of
  what an idle sandbox cost (4.0 -> 2.2 ms a second for a sandbox's VMM, 10 idle sandboxes over 30 s).

The samples live beside the VM (`<vm dir>/usage.pb`, length-delimited ResourceSample messages, rewritten when it
holds twice what is kept), so a compute restart keeps a sandbox's last hour; they go with the VM's directory. Only
running VMs of users are sampled: pool VMs are paused and nobody's yet.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from pathlib import Path

import structlog
from google.protobuf.internal.decoder import _DecodeVarint32
from google.protobuf.internal.encoder import _VarintBytes

from microvm.types.v1 import vm_pb2
from microvm.types.v1.resource_usage_pb2 import ResourceSample
from microvm.types.v1.vm_pb2 import VmRecord

log = structlog.get_logger()

KEEP_SECONDS = 3600.0
QUIET_PERCENT = 1.0
GUEST_VIEW_MAX_AGE = 60.0
USAGE_FILE = "usage.pb"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def memory_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident


def disk_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and entry.name != USAGE_FILE:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def tap_counters(tap: str) -> tuple[int, int]:
    """(guest received, guest sent) bytes."""
    if not tap:
        return 0, 0
    statistics = Path("/sys/class/net") / tap / "statistics"
    try:
        to_guest = int((statistics / "tx_bytes").read_text())
        from_guest = int((statistics / "rx_bytes").read_text())
    except OSError:
        return 0, 0
    return to_guest, from_guest


class ResourceSampler:
    def __init__(self, ledger, interval: float, guests=None) -> None:
        self.ledger, self.interval, self.guests = ledger, interval, guests
        self.capacity = max(2, math.ceil(KEEP_SECONDS / interval))
        self.samples: dict[str, collections.deque[ResourceSample]] = {}
        self._previous_cpu: dict[str, tuple[float, float]] = {}
        # vm id -> (time.monotonic() of the ping, guest memory total, used): what a quiet guest reported last.
        self._guest_views: dict[str, tuple[float, int, int]] = {}

    def usage(self, vm_id: str, after: float = 0.0, latest_only: bool = False) -> list[ResourceSample] | None:
        """Samples of a VM on this node taken after `after` (unix seconds), or None when it is not here."""
        vm = self.ledger.vms.get(vm_id)
        if vm is None or vm.pooled:
            return None
        kept = self._kept(vm)
        if latest_only:
            return list(kept)[-1:]
        return [sample for sample in kept if sample.time.ToNanoseconds() / 1e9 > after]

    def _kept(self, vm: VmRecord) -> collections.deque[ResourceSample]:
        kept = self.samples.get(vm.id)
        if kept is None:
            kept = self.samples[vm.id] = collections.deque(self._load(Path(vm.directory)), maxlen=self.capacity)
        return kept

    def _load(self, directory: Path) -> list[ResourceSample]:
        try:
            data = (directory / USAGE_FILE).read_bytes()
        except OSError:
            return []
        samples, position = [], 0
        try:
            while position < len(data):
                size, position = _DecodeVarint32(data, position)
                samples.append(ResourceSample.FromString(data[position : position + size]))
                position += size
        except Exception:  # a torn last record (a crash mid-write): keep what came before it
            pass
        horizon = time.time() - KEEP_SECONDS
        return [sample for sample in samples if sample.time.ToNanoseconds() / 1e9 >= horizon][-self.capacity :]

    def sample(self, vm: VmRecord) -> ResourceSample | None:
        """Takes one sample of a running VM and keeps it; None when its process is gone."""
        now = time.monotonic()
        try:
            used = cpu_seconds(vm.pid)
            memory = memory_bytes(vm.pid)
            disk = disk_bytes(Path(vm.directory))
        except (OSError, ValueError, IndexError):
            return None
        previous = self._previous_cpu.get(vm.id)
        self._previous_cpu[vm.id] = (now, used)
        percent = 0.0
        if previous is not None and now > previous[0]:
            percent = max(0.0, 100.0 * (used - previous[1]) / (now - previous[0]))
        received, sent = tap_counters(vm.nic.tap_device)
        sample = ResourceSample(
            cpu_percent=round(percent, 2),
            cpu_seconds=used,
            memory_bytes=memory,
            memory_limit_bytes=vm.memory_mib << 20,
            disk_bytes=disk,
            network_rx_bytes=received,
            network_tx_bytes=sent,
            vcpus=vm.vcpus,
        )
        sample.time.GetCurrentTime()
        return sample

    def keep(self, vm: VmRecord, sample: ResourceSample) -> None:
        kept = self._kept(vm)
        kept.append(sample)
        self._persist(Path(vm.directory), kept, sample)

    def _persist(self, directory: Path, kept, sample: ResourceSample) -> None:
        path = directory / USAGE_FILE
        record = sample.SerializeToString()
        try:
            if path.exists() and path.stat().st_size > 2 * self.capacity * (len(record) + 2):
                temporary = path.with_suffix(".tmp")
                records = [item.SerializeToString() for item in kept]
                temporary.write_bytes(b"".join(_VarintBytes(len(item)) + item for item in records))
                os.replace(temporary, path)
            else:
                with open(path, "ab") as out:
                    out.write(_VarintBytes(len(record)) + record)
        except OSError as error:  # a full disk loses history, never the VM
            log.warning("usage_not_persisted", directory=str(directory), error=str(error))

    def sample_host_side(self) -> list[tuple[VmRecord, ResourceSample]]:
        running = [
            vm
            for vm in list(self.ledger.vms.values())
            if vm.state == vm_pb2.VM_STATE_RUNNING and not vm.pooled and vm.pid
        ]
        for vm_id in set(self.samples) - set(self.ledger.vms):
            self.samples.pop(vm_id, None)  # deleted: its file went with its directory
            self._previous_cpu.pop(vm_id, None)
            self._guest_views.pop(vm_id, None)
        taken = [(vm, self.sample(vm)) for vm in running]
        return [(vm, sample) for vm, sample in taken if sample is not None]

    async def _add_guest_view(self, vm: VmRecord, sample: ResourceSample) -> None:
        now = time.monotonic()
        last = self._guest_views.get(vm.id)
        if last is not None and sample.cpu_percent < QUIET_PERCENT and now - last[0] < GUEST_VIEW_MAX_AGE:
            sample.guest_memory_total_bytes, sample.guest_memory_used_bytes = last[1], last[2]
            return  # a quiet guest's memory stands still; asking would wake it
        try:
            facts = await self.guests.facts(vm.id, timeout=min(2.0, self.interval))
        except Exception:  # a busy or gone agent: this sample has the host's view only
            return
        total, available = facts.mem_total_kib << 10, facts.mem_available_kib << 10
        sample.guest_memory_total_bytes, sample.guest_memory_used_bytes = total, max(0, total - available)
        self._guest_views[vm.id] = (now, total, sample.guest_memory_used_bytes)

    async def sample_all(self) -> int:
        """One sample of every running VM: the host's view (in a thread: /proc reads), the guest's (its agents, all
        at once), then kept and written."""
        taken = await asyncio.to_thread(self.sample_host_side)
        if self.guests is not None:
            await asyncio.gather(*(self._add_guest_view(vm, sample) for vm, sample in taken))

        def keep_all() -> None:
            for vm, sample in taken:
                self.keep(vm, sample)

        await asyncio.to_thread(keep_all)
        return len(taken)
