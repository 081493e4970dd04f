"""Everything the agent runs for the host goes into one cgroup whose `pids.max` caps the guest's processes.

A fork bomb in a guest used to take every process slot and the CPU with it, and exec never reported its exit. Now
what the agent starts lives in `/sys/fs/cgroup/workload` (cgroup v2, the pids controller): a bomb fills that cgroup
and stops there, while the agent, outside it, keeps answering, reports the exit of what it ran, and can stop it. A
new exec while the cgroup is full is refused with a clear error instead of hanging.

Processes inherit their parent's cgroup at fork, and subprocess spawns with vfork (no code runs in the child
first), so the agent steps into the cgroup for the spawn and back out: two small writes, no extra exec.

Those writes migrate a task, which takes the kernel's cgroup threadgroup lock for writing; by default that waits
for an RCU grace period, and every fork near it takes the lock's slow path. Under TCG that cost an exec 10 ms
(`Popen(["true"])` + wait in a guest: 36.8 ms with the two migrations against 26.2 without). cgroup2's
`favordynmods` (Linux 6.0+) keeps the lock ready for writers, which makes the migrations free (24.8 ms with them)
at a small cost to forks that the measurement does not show; kernels without it mount as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The cap's default follows the guest's memory (about one process per MiB: enough for builds and servers, too
# few for a bomb to exhaust a small guest's memory first), bounded below and above; `mvm.max_pids=N` overrides.
MIN_PIDS, MAX_PIDS = 256, 32768


def default_max_pids() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return max(MIN_PIDS, min(MAX_PIDS, int(line.split()[1]) // 1024))
    except (OSError, ValueError):
        pass
    return 1024


def mount_cgroup2(root: Path) -> None:
    from microvm_agent import system

    flags = system.MS_NOSUID | system.MS_NODEV | system.MS_NOEXEC
    try:
        system.mount("cgroup2", str(root), "cgroup2", flags, "favordynmods")
    except OSError:  # a kernel before 6.0 refuses the option (EINVAL)
        system.mount("cgroup2", str(root), "cgroup2", flags)


class Workload:
    def __init__(self) -> None:
        self.group: Path | None = None  # None: no cap (not PID 1, or no cgroup v2 in the guest kernel)
        self.max_pids = 0

    def setup(self, max_pids: int, root: Path = CGROUP_ROOT) -> bool:
        """Mounts cgroup2 (if needed) and makes the capped group; False, with the reason on stderr, if the kernel
        cannot (the guest then runs uncapped, as before)."""

        try:
            mount_cgroup2(root)
            (root / "cgroup.subtree_control").write_text("+pids")
            group = root / "workload"
            group.mkdir(exist_ok=True)
            (group / "pids.max").write_text(str(max_pids) if max_pids > 0 else "max")  # mvm.max_pids=0: uncapped
        except OSError as exc:
            print(f"microvm-agent: no process cap ({exc})", file=sys.stderr, flush=True)
            return False
        # Kept open: a spawn then costs two write(2)s, not two opens and closes as well (about 1 ms less under TCG).
        self._enter = os.open(group / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        self._leave = os.open(root / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        self._pid = str(os.getpid()).encode()
        self.group, self.max_pids = group, max_pids
        return True

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """The agent inside the group for the duration: what it spawns now is born there."""
        if self.group is None:
            yield
            return
        os.write(self._enter, self._pid)
        try:
            yield
        finally:
            os.write(self._leave, self._pid)

    def count(self) -> int:
        try:
            return int((self.group / "pids.current").read_text()) if self.group else 0
        except (OSError, ValueError):
            return 0


current = Workload()
