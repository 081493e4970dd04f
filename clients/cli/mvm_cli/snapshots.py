"""Snapshot commands: snapshot (take one), snapshots [ls|get|rm], restore, fork."""

from __future__ import annotations

import argparse
import sys

from microvm_sandbox import Sandbox
from microvm_sandbox.aio import snapshot_name
from mvm_cli.context import Context, for_each
from mvm_cli.output import emit, short, snapshot_table, snapshot_view, to_json
from mvm_cli.parsing import add_json, add_listing, command_parser, parse_duration, parse_pairs


def _add_list_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # Given to both `snapshots` and `snapshots ls`; on `snapshots ls` SUPPRESS keeps what `snapshots` read.
    default = "" if defaults else argparse.SUPPRESS
    parser.add_argument("--sandbox", metavar="ID", default=default, help="only snapshots of this sandbox")
    add_listing(parser, keep=not defaults)


def register(sub) -> None:
    snapshot = command_parser(
        sub,
        "snapshot",
        "snapshot a sandbox (memory, processes, disk) and print the snapshot's id",
        "mvm snapshot sbx-1a2b3c --label step=1 --ttl 2h",
    )
    snapshot.add_argument("id", metavar="ID", help="the sandbox's id")
    snapshot.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    snapshot.add_argument(
        "--ttl", type=parse_duration, default=None, metavar="DURATION", help="delete it after this long (default: kept)"
    )
    add_json(snapshot)
    snapshot.set_defaults(handler=snapshot_command)

    snapshots = command_parser(
        sub,
        "snapshots",
        "list, show and delete snapshots",
        "mvm snapshots --sandbox sbx-1a2b3c\n  mvm snapshots rm snap-0123abcd4567 snap-89ef01234567",
        description="List snapshots as a lineage tree (children under the snapshot their source was restored "
        "from), show one, or delete some.",
    )
    _add_list_options(snapshots, defaults=True)
    snapshots.set_defaults(handler=list_command)
    actions = snapshots.add_subparsers(dest="action", metavar="{ls,get,rm}")
    ls = command_parser(actions, "ls", "list snapshots as a lineage tree", "mvm snapshots ls --json", aliases=["list"])
    _add_list_options(ls, defaults=False)
    ls.set_defaults(handler=list_command)
    get = command_parser(actions, "get", "show one snapshot", "mvm snapshots get snap-0123abcd4567")
    get.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot's id")
    add_json(get)
    get.set_defaults(handler=get_command)
    rm = command_parser(
        actions, "rm", "delete snapshots", "mvm snapshots rm snap-0123abcd4567 snap-89ef01234567", aliases=["delete"]
    )
    rm.add_argument("snapshots", nargs="+", metavar="SNAPSHOT", help="snapshot ids")
    rm.set_defaults(handler=rm_command)

    restore = command_parser(
        sub,
        "restore",
        "start a new sandbox from a snapshot and print its id",
        "mvm restore snap-0123abcd4567 --timeout 1h",
    )
    restore.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot's id")
    restore.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    restore.add_argument(
        "--timeout", type=parse_duration, default=None, metavar="DURATION", help="lifetime (default: the server's)"
    )
    add_json(restore)
    restore.set_defaults(handler=restore_command)

    fork = command_parser(
        sub,
        "fork",
        "clone a running sandbox and print the clones' ids",
        "mvm fork sbx-1a2b3c -n 3 --label try=alternatives",
        description="Clone a running sandbox into COUNT independent sandboxes (memory, processes and files). The "
        "snapshot they are made from is deleted unless --keep-snapshot.",
    )
    fork.add_argument("id", metavar="ID", help="the sandbox's id")
    fork.add_argument("-n", "--count", type=int, default=1, help="number of clones, 1..64")
    fork.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label of every clone (repeatable)")
    fork.add_argument("--keep-snapshot", action="store_true", help="keep the snapshot the clones were made from")
    add_json(fork)
    fork.set_defaults(handler=fork_command)


def snapshot_command(ctx: Context, args) -> int:
    taken = ctx.sandbox_by_name(args.id).snapshot(parse_pairs(args.label, "label"), ttl=args.ttl)
    emit(to_json(ctx.snapshot_message(taken.name)) if args.json else taken.id)
    return 0


def list_command(ctx: Context, args) -> int:
    snapshots = ctx.client.list_snapshots(args.sandbox)
    if args.json:
        emit(to_json(snapshots))
    elif args.quiet:
        emit("\n".join(short(s.name) for s in snapshots))
    else:
        emit(snapshot_table(snapshots, header=not args.no_headers))
    return 0


def get_command(ctx: Context, args) -> int:
    message = ctx.snapshot_message(args.snapshot)
    emit(to_json(message) if args.json else snapshot_view(message))
    return 0


def rm_command(ctx: Context, args) -> int:
    def delete(snapshot: str) -> str:
        ctx.client.delete_snapshot(snapshot)
        return f"deleted {short(snapshot_name(snapshot))}"

    return for_each(args.snapshots, delete, "snapshots rm", noun="snapshot")


def restore_command(ctx: Context, args) -> int:
    sandbox = Sandbox.restore(
        args.snapshot, client=ctx.client, timeout=args.timeout, labels=parse_pairs(args.label, "label")
    )
    emit(to_json(sandbox.message) if args.json else sandbox.id)
    return 0


def fork_command(ctx: Context, args) -> int:
    clones = ctx.sandbox_by_name(args.id).fork(
        args.count, labels=parse_pairs(args.label, "label"), keep_snapshot=args.keep_snapshot
    )
    if args.json:
        emit(to_json([clone.message for clone in clones]))
    else:
        emit("\n".join(clone.id for clone in clones))
        if args.keep_snapshot and clones:
            emit(f"kept snapshot {clones[0].source_snapshot}", sys.stderr)
    return 0
