"""Network commands: expose and unexpose a guest port on the sandbox's host, and egress (the outbound policy)."""

from __future__ import annotations

import argparse

from microvm_sandbox.aio import sandbox_name
from mvm_cli.context import Context
from mvm_cli.output import emit, sandbox_view, short, to_json
from mvm_cli.parsing import add_json, command_parser


def add_egress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--egress",
        choices=["none", "full", "allow-list"],
        default=None,
        help="outbound network: none (the default), full, or allow-list (see --allow)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        metavar="CIDR[:PORTS]",
        help="allowed destination, e.g. 203.0.113.0/24:80,443 (repeatable; implies allow-list)",
    )


def register(sub) -> None:
    expose = command_parser(
        sub, "expose", "make a guest port reachable on the sandbox's host", "mvm expose sbx-1a2b3c 8000"
    )
    expose.add_argument("id", metavar="ID", help="the sandbox's id")
    expose.add_argument("guest_port", type=int, metavar="GUEST_PORT")
    expose.add_argument("--host-port", type=int, default=0, help="0: a free port of the node's range")
    expose.add_argument("--host-address", default="", help="the node's first allowed address, 127.0.0.1")
    expose.set_defaults(handler=expose_command)

    unexpose = command_parser(
        sub, "unexpose", "stop exposing a guest port on the sandbox's host", "mvm unexpose sbx-1a2b3c 8000"
    )
    unexpose.add_argument("id", metavar="ID", help="the sandbox's id")
    unexpose.add_argument("guest_port", type=int, metavar="GUEST_PORT")
    unexpose.add_argument("--host-port", type=int, default=0, help="only this host port (0: any)")
    unexpose.add_argument("--host-address", default="", help="only this host address (empty: any)")
    unexpose.set_defaults(handler=unexpose_command)

    egress = command_parser(
        sub,
        "egress",
        "replace a sandbox's outbound network policy",
        "mvm egress sbx-1a2b3c --allow 203.0.113.0/24:443",
    )
    egress.add_argument("id", metavar="ID", help="the sandbox's id")
    add_egress_options(egress)
    add_json(egress)
    egress.set_defaults(handler=egress_command)


def expose_command(ctx: Context, args) -> int:
    port = ctx.sandbox_by_name(args.id).expose_port(args.guest_port, args.host_port, args.host_address)
    emit(f"{port.host_address}:{port.host_port} -> {short(sandbox_name(args.id))}:{port.guest_port}")
    return 0


def unexpose_command(ctx: Context, args) -> int:
    removed = ctx.sandbox_by_name(args.id).unexpose_port(args.guest_port, args.host_port, args.host_address)
    for port in removed:
        emit(f"closed {port.host_address}:{port.host_port} -> {short(sandbox_name(args.id))}:{port.guest_port}")
    return 0


def egress_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox_by_name(args.id)
    sandbox.set_egress(args.egress, args.allow or ())
    emit(to_json(sandbox.message) if args.json else sandbox_view(sandbox.message))
    return 0
