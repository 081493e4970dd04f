"""The CPU priority of a VMM process: pool VMs are filled in the background, below the sandboxes in use.

Linux keeps a nice value per thread, so every thread of the process is set; threads made later inherit it from
the thread that makes them.
"""

from __future__ import annotations

import os
import resource

import structlog

log = structlog.get_logger()


def set_niceness(pid: int, niceness: int) -> None:
    """Sets `niceness` on every thread of `pid`; a process that is gone (or not ours to change) is left alone."""
    if pid <= 0:
        return
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, int(thread), niceness)
        except ProcessLookupError:
            continue  # it ended meanwhile
        except PermissionError as exc:  # raising it back needs CAP_SYS_NICE
            log.warning("vmm_niceness_not_set", pid=pid, niceness=niceness, error=str(exc))
            return


def can_raise_back() -> bool:
    """Whether this process may set a thread's nice value back to 0 (root, or RLIMIT_NICE allows it): a pool VM
    is only lowered if its claim can restore it."""
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20
