"""`mvm logs SERVICE [-f]`: a service's JSON log on this host (the installation `make up` runs keeps each service's in
$MVM_STATE_DIR/logs/<service>.log), optionally only the lines of one sandbox or trace; `mvm logs --sandbox ID [-f]`:
the sandbox's serial console (the guest kernel and its agent), through the API, from any host.

Both start with the last --tail lines (bytes for a console: it is not line-based) and, with -f, go on printing what
is written until Ctrl-C; nothing is read whole into memory."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import deque
from pathlib import Path

from mvm_cli.context import Context
from mvm_cli.parsing import CliError, command_parser

SERVICES = ("gateway", "auth", "compute", "network", "relay", "snapshot", "etcd", "prometheus", "supervisor")
POLL_SECONDS = 0.5
CONSOLE_TAIL_BYTES = 16384


def state_dir() -> Path:
    return Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm")


def register(sub) -> None:
    logs = command_parser(
        sub,
        "logs",
        "a service's log on this host, or a sandbox's console",
        "mvm logs gateway -f --sandbox-id sbx-1a2b3c",
        description="SERVICE: the newest --tail lines of that service's JSON log on this host ($MVM_STATE_DIR/logs), "
        "with --sandbox-id or --trace only the lines that name that sandbox or trace id. --sandbox ID instead: the "
        "sandbox's serial console (guest kernel and agent) through the API, the newest --tail bytes. -f keeps "
        "printing until Ctrl-C.",
    )
    logs.add_argument("service", nargs="?", choices=SERVICES, metavar="SERVICE", help=", ".join(SERVICES))
    logs.add_argument("--sandbox", metavar="ID", help="a sandbox's console instead of a service's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is written")
    logs.add_argument("--tail", type=int, default=None, help="lines (a service) or bytes (a console) to start with")
    logs.add_argument("--sandbox-id", metavar="ID", help="only a service's lines about this sandbox (its cluster id)")
    logs.add_argument("--trace", metavar="TRACE_ID", help="only a service's lines of this trace")
    logs.set_defaults(handler=logs_command)


def logs_command(ctx: Context, args) -> int:
    if bool(args.service) == bool(args.sandbox):
        raise CliError("name a SERVICE or give --sandbox ID (one of them)")
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if args.follow else None
    try:
        if args.sandbox:
            return console(ctx, args, stop)
        return service_log(args, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def wanted(line: str, sandbox: str | None, trace: str | None) -> bool:
    if not (sandbox or trace):
        return True
    try:
        entry = json.loads(line)
    except ValueError:
        return False  # not one of the service's JSON lines (a traceback's continuation)
    return (not sandbox or entry.get("sandbox") == sandbox or entry.get("vm") == sandbox) and (
        not trace or entry.get("trace_id") == trace
    )


def service_log(args, stop: threading.Event) -> int:
    path = state_dir() / "logs" / f"{args.service}.log"
    try:
        log = open(path, "rb")
    except FileNotFoundError:
        raise CliError(f"no log of {args.service} on this host at {path} (is `make up` running here?)") from None
    with log:
        tail = 50 if args.tail is None else max(0, args.tail)
        # The newest `tail` matching lines, holding no more than that many in memory.
        last = deque((line for line in map(decoded, log) if wanted(line, args.sandbox_id, args.trace)), maxlen=tail)
        sys.stdout.writelines(last)
        sys.stdout.flush()
        while args.follow and not stop.is_set():
            line = log.readline()
            if not line:
                if log.tell() > os.stat(path).st_size:  # rotated or truncated: start again from its beginning
                    log.seek(0)
                stop.wait(POLL_SECONDS)
                continue
            if wanted(text := decoded(line), args.sandbox_id, args.trace):
                sys.stdout.write(text)
                sys.stdout.flush()
    return 0


def decoded(line: bytes) -> str:
    return line.decode(errors="replace")


def console(ctx: Context, args, stop: threading.Event) -> int:
    sandbox = ctx.sandbox_by_name(args.sandbox)
    tail = CONSOLE_TAIL_BYTES if args.tail is None else max(0, args.tail)
    output = sandbox.read_console_log(tail_bytes=max(tail, 1))  # at least a byte: where the console ends now
    sys.stdout.buffer.write(output.data[-tail:] if tail else b"")
    sys.stdout.flush()
    offset = output.end
    while args.follow and not stop.is_set():
        stop.wait(POLL_SECONDS)
        more = sandbox.read_console_log(offset=offset)
        if more.data:
            sys.stdout.buffer.write(more.data)
            sys.stdout.flush()
        offset = more.end
    return 0
