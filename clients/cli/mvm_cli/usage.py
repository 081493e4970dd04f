"""`mvm metrics ID [-f]` (a sandbox's CPU, memory, disk and network, the last hour or live) and `mvm top` (the
newest sample of each of your sandboxes, sorted, refreshed until Ctrl-C)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading

from microvm_sandbox import ResourceUsage, SandboxUsage
from mvm_cli.context import Context
from mvm_cli.output import emit, short, table
from mvm_cli.parsing import add_json, command_parser, parse_pairs

COLUMNS = ("TIME", "CPU%", "MEMORY", "OF", "DISK", "NET IN", "NET OUT")
TOP_COLUMNS = ("SANDBOX", "TEMPLATE", "CPU%", "MEMORY", "OF", "DISK", "NET IN", "NET OUT")
SORT_KEYS = {
    "cpu": lambda entry: entry.usage.cpu_percent,
    "memory": lambda entry: entry.usage.memory_bytes,
    "disk": lambda entry: entry.usage.disk_bytes,
    "network": lambda entry: entry.usage.network_rx_bytes + entry.usage.network_tx_bytes,
}


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f}MiB"


def cells(usage: ResourceUsage) -> list[str]:
    return [
        f"{usage.cpu_percent:.1f}",
        mib(usage.memory_bytes),
        mib(usage.memory_limit_bytes),
        mib(usage.disk_bytes),
        mib(usage.network_rx_bytes),
        mib(usage.network_tx_bytes),
    ]


def usage_json(usage: ResourceUsage) -> str:
    return json.dumps({**dataclasses.asdict(usage), "time": usage.time.isoformat()})


def register(sub) -> None:
    metrics = command_parser(
        sub,
        "metrics",
        "a sandbox's CPU, memory, disk and network use",
        "mvm metrics sbx-1a2b3c -f",
        description="The samples of the last hour (one every few seconds, taken on the sandbox's node from the host "
        "side: CPU in percent of one host core, the memory its VM holds, the disk it wrote, the bytes its network "
        "moved). With -f, then each new sample until the sandbox ends or Ctrl-C. --json: one JSON object a line.",
    )
    metrics.add_argument("id", metavar="ID", help="the sandbox's id")
    metrics.add_argument("-f", "--follow", action="store_true", help="keep printing new samples")
    add_json(metrics)
    metrics.set_defaults(handler=metrics_command)

    top = command_parser(
        sub,
        "top",
        "your sandboxes by CPU or memory use, live",
        "mvm top --sort memory",
        description="The newest sample of each of your running sandboxes, sorted (most first), refreshed every "
        "--interval seconds until Ctrl-C; --once prints one table and exits.",
    )
    top.add_argument("--sort", choices=sorted(SORT_KEYS), default="cpu", help="what to sort by (default cpu)")
    top.add_argument("--label", action="append", metavar="KEY=VALUE", help="only sandboxes with this label")
    top.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    top.add_argument("--once", action="store_true", help="print once and exit")
    add_json(top)
    top.set_defaults(handler=top_command)


def metrics_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox(args.id)
    samples = sandbox.watch_metrics() if args.follow else iter(sandbox.get_metrics())
    if args.json:
        for usage in samples:
            print(usage_json(usage), flush=True)
        return 0
    if not args.follow:
        emit(table(COLUMNS, ([u.time.strftime("%H:%M:%S"), *cells(u)] for u in samples)))
        return 0
    print(table(COLUMNS, []), flush=True)
    for usage in samples:
        print(table(COLUMNS, [[usage.time.strftime("%H:%M:%S"), *cells(usage)]], header=False), flush=True)
    return 0


def top_table(entries: list[SandboxUsage], sort: str) -> str:
    ordered = sorted(entries, key=SORT_KEYS[sort], reverse=True)
    return table(TOP_COLUMNS, ([short(e.sandbox), e.template, *cells(e.usage)] for e in ordered))


def top_command(ctx: Context, args) -> int:
    labels = parse_pairs(args.label, "--label")
    stop = threading.Event()
    previous = None if args.once else signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while True:
            entries = ctx.client.list_metrics(labels=labels)
            if args.json:
                print(
                    json.dumps(
                        [
                            {"sandbox": e.sandbox, "template": e.template, **json.loads(usage_json(e.usage))}
                            for e in entries
                        ]
                    ),
                    flush=True,
                )
            else:
                if not args.once and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # a screen of its own, as top(1)
                emit(top_table(entries, args.sort) or "no running sandbox has a sample yet")
                sys.stdout.flush()
            if args.once or stop.wait(args.interval):
                return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
