"""`mvm events`: your sandboxes' lifecycle events; `mvm webhooks`: webhooks that POST them to a URL (docs/events.md).

mvm events [--since CURSOR] [-f] [--type T]... [--label K=V]...   what happened since CURSOR (-f: and then, live)
mvm events --cursor                                              the cursor of now, to resume from later
mvm webhooks [list]                                              your webhooks
mvm webhooks create URL [--type T]... [--label K=V]... [--description TEXT]   prints its secret, once
mvm webhooks delete ID...
mvm webhooks deliveries ID                                       its recent deliveries, newest first

Event types: created, started, paused, resumed, snapshotted, deleted, failed, expired, node_lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from microvm_sandbox.events import EVENT_TYPES, SandboxEvent
from microvm_sandbox.webhooks import WebhookDelivery, WebhookInfo
from mvm_cli.context import Context, for_each
from mvm_cli.output import emit, labels_text, table
from mvm_cli.parsing import add_json, add_listing, command_parser, parse_pairs

# Events are printed one line at a time as they come, so the columns have fixed widths (a longer value pushes on).
EVENT_COLUMNS = (("CURSOR", 12), ("TIME", 8), ("TYPE", 11), ("SANDBOX", 24), ("STATE", 11), ("DETAILS", 0))
WEBHOOK_COLUMNS = ("WEBHOOK", "URL", "TYPES", "LABELS", "CURSOR")
DELIVERY_COLUMNS = ("TIME", "EVENT", "SANDBOX", "STATE", "ATTEMPTS", "HTTP", "ERROR")


def json_line(value) -> str:
    return json.dumps(dataclasses.asdict(value), default=str, sort_keys=True)


def event_line(values) -> str:
    return "  ".join(str(value).ljust(width) for value, (_, width) in zip(values, EVENT_COLUMNS, strict=True)).rstrip()


def event_row(event: SandboxEvent) -> list[object]:
    details = event.message or event.snapshot or labels_text(event.labels)
    return [event.cursor, event.time.strftime("%H:%M:%S"), event.type, event.sandbox_id, event.state, details]


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", action="append", default=[], choices=EVENT_TYPES, metavar="TYPE", help="repeatable")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable")


def register(sub) -> None:
    events = command_parser(
        sub,
        "events",
        "your sandboxes' lifecycle events",
        "C=$(mvm events --cursor) && mvm create && mvm events --since $C",
        description=__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
    )
    events.add_argument("-f", "--follow", action="store_true", help="keep printing events as they happen")
    events.add_argument("--since", default="", metavar="CURSOR", help="the events after this cursor")
    events.add_argument("--cursor", action="store_true", help="print where the events stand now and exit")
    events.add_argument("--tenant", default="", help="another tenant's (`*`: every tenant's): operators only")
    events.add_argument("--json", action="store_true", help="one JSON object per event")
    events.add_argument("--no-headers", action="store_true", help="leave out the header row")
    add_filters(events)
    events.set_defaults(handler=events_command)

    hooks = command_parser(
        sub, "webhooks", "webhooks that POST your sandboxes' events", "mvm webhooks create https://ci.example.com/h"
    )
    add_listing(hooks, "webhook ids")
    hooks.set_defaults(handler=webhooks_command)
    actions = hooks.add_subparsers(dest="action", metavar="{list,create,delete,deliveries}")
    listing = command_parser(actions, "list", "your webhooks", "mvm webhooks list --json")
    add_listing(listing, "webhook ids", keep=True)
    create = command_parser(
        actions, "create", "a webhook; prints its signing secret, once", "mvm webhooks create URL --type failed"
    )
    create.add_argument("url", metavar="URL")
    add_filters(create)
    create.add_argument("--description", default="", help="a note, at most 256 bytes")
    add_json(create)
    delete = command_parser(actions, "delete", "delete webhooks", "mvm webhooks delete wh-0123456789ab")
    delete.add_argument("ids", nargs="+", metavar="ID")
    deliveries = command_parser(actions, "deliveries", "a webhook's recent deliveries", "mvm webhooks deliveries ID")
    deliveries.add_argument("id", metavar="ID")
    add_json(deliveries)
    for parser in (listing, create, delete, deliveries):
        parser.set_defaults(handler=webhooks_command)


def events_command(ctx: Context, args) -> int:
    labels = parse_pairs(args.label, "label")
    stream = ctx.client.events.watch(args.type, labels, args.since, args.follow and not args.cursor, args.tenant)
    with stream:
        if not (args.json or args.no_headers or args.cursor):
            emit(event_line(name for name, _ in EVENT_COLUMNS))
        for event in stream:
            if not args.cursor:
                emit(json_line(event) if args.json else event_line(event_row(event)))
                sys.stdout.flush()
        if args.cursor:
            emit(stream.cursor)
        else:
            print(f"# resume with: mvm events --since {stream.cursor}", file=sys.stderr)
    return 0


def webhook_row(hook: WebhookInfo) -> list[object]:
    return [hook.id, hook.url, ",".join(hook.types) or "all", labels_text(hook.labels), hook.cursor or "-"]


def delivery_row(delivery: WebhookDelivery) -> list[object]:
    when = delivery.last_attempt_time or delivery.first_attempt_time
    return [
        when.strftime("%Y-%m-%d %H:%M:%S") if when else "-",
        delivery.event.type,
        delivery.event.sandbox_id,
        delivery.state,
        delivery.attempts,
        delivery.last_status_code or "-",
        delivery.last_error or "-",
    ]


def webhooks_command(ctx: Context, args) -> int:
    hooks, action = ctx.client.webhooks, getattr(args, "action", None) or "list"
    if action == "create":
        hook = hooks.create(args.url, args.type, parse_pairs(args.label, "label"), args.description)
        if args.json:
            emit(json_line(hook))
        else:
            emit(f"webhook  {hook.id}\nsecret   {hook.secret}")
            print("# keep the secret: it is shown only now (it verifies X-Mvm-Signature)", file=sys.stderr)
    elif action == "delete":
        return for_each(args.ids, lambda ident: (hooks.delete(ident), f"deleted {ident}")[1], "delete", "webhook")
    elif action == "deliveries":
        found = hooks.deliveries(args.id)
        emit("\n".join(json_line(d) for d in found) if args.json else table(DELIVERY_COLUMNS, map(delivery_row, found)))
    else:
        found = hooks.list()
        if args.json:
            emit("\n".join(json_line(hook) for hook in found))
        elif args.quiet:
            emit("\n".join(hook.id for hook in found))
        else:
            emit(table(WEBHOOK_COLUMNS, [webhook_row(h) for h in found], header=not args.no_headers))
    return 0
