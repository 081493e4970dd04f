"""Starting a user template's service in a fresh guest: its start command, detached, then its ready check.

Runs after a template image boots (for its template snapshot, and on a cold boot when there is no snapshot), so
a sandbox's first command finds the server already up. Only POSIX sh is assumed in the image (Debian, Alpine's
busybox): the start command gets the image's environment and working directory, its output goes to
/var/log/mvm-start.log, and a port check reads /proc/net/tcp{,6} (no netstat, ss or python needed).
"""

from __future__ import annotations

import asyncio
import shlex
import time

from microvm.types.v1 import template_pb2
from services.common import deadlines
from services.common.errors import FailedPrecondition

START_LOG = "/var/log/mvm-start.log"
POLL_SECONDS = 0.2


def start_script(config: template_pb2.ImageConfig) -> str:
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(config.env.items()))
    workdir = shlex.quote(config.workdir or "/")
    command = " ".join(shlex.quote(arg) for arg in config.start_argv)
    return (
        f"{exports}mkdir -p /var/log; cd {workdir} || exit 1\n"
        f"( setsid {command} ) >{START_LOG} 2>&1 </dev/null &\n"
        "exit 0\n"
    )


def port_check(port: int) -> list[str]:
    """Exits 0 when something listens on TCP `port` (IPv4 or IPv6)."""
    script = (
        f'want=$(printf ":%04X" {port})\n'
        "for table in /proc/net/tcp /proc/net/tcp6; do\n"
        '  [ -r "$table" ] || continue\n'
        "  while read -r _ local _ state _; do\n"
        '    case "$local" in *"$want") [ "$state" = 0A ] && exit 0;; esac\n'
        '  done < "$table"\n'
        "done\n"
        "exit 1\n"
    )
    return ["/bin/sh", "-c", script]


def ready_check(config: template_pb2.ImageConfig) -> list[str] | None:
    if config.ready_argv:
        exports = "".join(f"export {n}={shlex.quote(v)}\n" for n, v in sorted(config.env.items()))
        workdir = shlex.quote(config.workdir or "/")
        return ["/bin/sh", "-c", f'{exports}cd {workdir} || exit 1\nexec "$@"', "ready", *config.ready_argv]
    if config.ready_port:
        return port_check(config.ready_port)
    return None


async def start_service(guests, vm_id: str, config: template_pb2.ImageConfig) -> None:
    """Starts the image's service and waits until its ready check passes; FAILED_PRECONDITION (reason
    TEMPLATE_NOT_READY) with the end of its log when it does not within the timeout."""
    if not config.start_argv and not config.ready_argv and not config.ready_port:
        return
    if config.start_argv:
        code = await guests.run(vm_id, ["/bin/sh", "-c", start_script(config)], timeout=deadlines.GUEST)
        if code != 0:
            raise FailedPrecondition(
                f"the template's start command could not be started (exit {code}); is its working directory "
                f"{config.workdir or '/'} there?",
                reason="TEMPLATE_START_FAILED",
            )
    check = ready_check(config)
    if check is None:
        return
    timeout = config.ready_timeout_seconds or 60
    deadline = time.monotonic() + timeout
    while True:
        if await guests.run(vm_id, check, timeout=deadlines.GUEST) == 0:
            return
        if time.monotonic() > deadline:
            raise FailedPrecondition(
                f"the template's ready check did not pass within {timeout}s (its start command logs to {START_LOG})",
                reason="TEMPLATE_NOT_READY",
            )
        await asyncio.sleep(POLL_SECONDS)
