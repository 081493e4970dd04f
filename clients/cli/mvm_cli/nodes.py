"""`mvm nodes`: the cluster's hosts, for operators (the admin role of an operator tenant).

mvm nodes                                  list every node: state, load, labels
mvm nodes get NODE
mvm nodes cordon NODE [--reason TEXT]      no new sandboxes on it
mvm nodes uncordon NODE
mvm nodes drain NODE [--migrate] [--reason TEXT] [--no-wait]
    --migrate   move each sandbox to another node (same id, files and running processes)
    otherwise   cordon it and wait until its sandboxes have ended (--no-wait: return at once)
"""

from __future__ import annotations

import sys
import time

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from mvm_cli.channel import connect
from mvm_cli.context import Context
from mvm_cli.output import emit, fields, labels_text, table, to_json
from mvm_cli.parsing import add_json, add_listing, command_parser

STATE = {nodes_pb2.NODE_STATE_READY: "Ready", nodes_pb2.NODE_STATE_UNAVAILABLE: "Unavailable"}
COLUMNS = ("NODE", "STATE", "SANDBOXES", "VCPUS", "MEMORY", "HYPERVISOR", "LABELS")


def node_name(node: str) -> str:
    return node if node.startswith("nodes/") else f"nodes/{node}"


def state(node: nodes_pb2.Node) -> str:
    return STATE.get(node.state, "?") + (",Draining" if node.draining else ",Cordoned" if node.cordoned else "")


def row(node: nodes_pb2.Node) -> list[object]:
    return [
        node.name.removeprefix("nodes/"),
        state(node),
        node.sandbox_count,
        f"{node.vcpus_allocated}/{node.vcpus_total}",
        f"{node.memory_mib_allocated}/{node.memory_mib_total}MiB",
        node.hypervisor or "-",
        labels_text(node.labels) + (f"  ({node.reason})" if node.reason else ""),
    ]


def describe(node: nodes_pb2.Node) -> str:
    """One node, one field a line."""
    return fields(
        [
            ("node", node.name.removeprefix("nodes/")),
            ("state", state(node)),
            ("reason", node.reason or "-"),
            ("sandboxes", node.sandbox_count),
            ("vcpus", f"{node.vcpus_allocated} of {node.vcpus_total} allocated"),
            ("memory", f"{node.memory_mib_allocated} of {node.memory_mib_total} MiB allocated"),
            ("hypervisor", node.hypervisor or "-"),
            ("labels", labels_text(node.labels)),
        ]
    )


def register(sub) -> None:
    nodes = command_parser(
        sub,
        "nodes",
        "list and manage the cluster's nodes (operators)",
        "mvm nodes drain n2 --migrate --reason 'kernel update'",
        description=__doc__,
    )
    add_listing(nodes, "names")
    nodes.set_defaults(handler=nodes_command)
    actions = nodes.add_subparsers(dest="action", metavar="{get,cordon,uncordon,drain}")
    get = command_parser(actions, "get", "show one node", "mvm nodes get n1 --json")
    get.add_argument("node", metavar="NODE")
    add_json(get)
    cordon = command_parser(actions, "cordon", "place no new sandbox on a node", "mvm nodes cordon n1 --reason 'disk'")
    cordon.add_argument("node", metavar="NODE")
    cordon.add_argument("--reason", default="", help="why, shown in `mvm nodes`")
    add_json(cordon)
    uncordon = command_parser(actions, "uncordon", "make a node schedulable again", "mvm nodes uncordon n1")
    uncordon.add_argument("node", metavar="NODE")
    add_json(uncordon)
    drain = command_parser(actions, "drain", "empty a node (cordons it)", "mvm nodes drain n2 --migrate")
    drain.add_argument("node", metavar="NODE")
    drain.add_argument("--migrate", action="store_true", help="move its sandboxes to other nodes")
    drain.add_argument("--reason", default="", help="why, shown in `mvm nodes`")
    drain.add_argument("--no-wait", action="store_true", help="without --migrate: do not wait for it to empty")
    add_json(drain)
    for parser in (get, cordon, uncordon, drain):
        parser.set_defaults(handler=nodes_command)


def show(node: nodes_pb2.Node, args) -> None:
    emit(to_json(node) if getattr(args, "json", False) else describe(node))


def nodes_command(ctx: Context, args) -> int:
    stub = nodes_pb2_grpc.NodeServiceStub(connect(ctx.gateway, ctx.key))
    action = getattr(args, "action", None)
    if not action:
        found = stub.ListNodes(nodes_pb2.ListNodesRequest(), timeout=30).nodes
        if args.json:
            emit(to_json(list(found)))
        elif args.quiet:
            emit("\n".join(n.name.removeprefix("nodes/") for n in found))
        else:
            emit(table(COLUMNS, [row(n) for n in found], header=not args.no_headers))
    elif action == "get":
        show(stub.GetNode(nodes_pb2.GetNodeRequest(name=node_name(args.node)), timeout=30).node, args)
    elif action == "cordon":
        request = nodes_pb2.CordonNodeRequest(name=node_name(args.node), reason=args.reason)
        show(stub.CordonNode(request, timeout=30).node, args)
    elif action == "uncordon":
        show(stub.UncordonNode(nodes_pb2.UncordonNodeRequest(name=node_name(args.node)), timeout=30).node, args)
    elif action == "drain":
        drained = stub.DrainNode(
            nodes_pb2.DrainNodeRequest(name=node_name(args.node), migrate=args.migrate, reason=args.reason),
            timeout=3600,
        )
        for name in drained.migrated:
            print(f"migrated {name.removeprefix('sandboxes/')}", file=sys.stderr if args.json else sys.stdout)
        node = drained.node
        while not args.migrate and not args.no_wait and node.sandbox_count:
            print(f"waiting for {node.sandbox_count} sandboxes to end on {args.node}", file=sys.stderr)
            time.sleep(5)
            node = stub.GetNode(nodes_pb2.GetNodeRequest(name=node_name(args.node)), timeout=30).node
        show(node, args)
    return 0
