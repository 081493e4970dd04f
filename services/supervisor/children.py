"""How the supervisor starts a child process: one that dies with the supervisor."""

from __future__ import annotations

import ctypes
import shutil
import signal

_PR_SET_PDEATHSIG = 1
# If the supervisor itself is killed, its children get SIGTERM instead of becoming orphans (PR_SET_PDEATHSIG).
# util-linux's setpriv sets that and execs the child's command. Setting it in a preexec function instead made Python
# fork the supervisor, whose gRPC threads (its etcd client) then ran their fork handlers in the child: under load one
# child aborted there before its exec (SIGABRT after "epoll_wait error: Bad file descriptor"). Without a preexec
# function the child is spawned by vfork, and no fork handler runs.
SETPRIV = shutil.which("setpriv")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_spawn(command: list[str]) -> tuple[list[str], object]:
    """The argv and preexec function that start `command` as a child dying with this process."""
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "TERM", "--", *command], None
    return list(command), _die_with_parent  # no setpriv: the fork, as before
