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

import argparse
import sys
import time

import grpc

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc

STATE = {nodes_pb2.NODE_STATE_READY: "Ready", nodes_pb2.NODE_STATE_UNAVAILABLE: "Unavailable"}


def node_name(node: str) -> str:
    return node if node.startswith("nodes/") else f"nodes/{node}"


def describe(node: nodes_pb2.Node) -> str:
    state = STATE.get(node.state, "?") + (",Draining" if node.draining else ",Cordoned" if node.cordoned else "")
    labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.items()))
    return (
        f"{node.name.removeprefix('nodes/'):14} {state:22} {node.sandbox_count:>3} sandboxes  "
        f"{node.vcpus_allocated:>3}/{node.vcpus_total:<3} vCPU  {node.memory_mib_allocated:>6}/"
        f"{node.memory_mib_total:<6} MiB  {node.hypervisor:16} {labels}" + (f"  ({node.reason})" if node.reason else "")
    ).rstrip()


def add_node_commands(sub) -> None:
    nodes = sub.add_parser(
        "nodes",
        help="list and manage the cluster's nodes (operators)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = nodes.add_subparsers(dest="action")
    actions.add_parser("get", help="show one node").add_argument("node")
    cordon = actions.add_parser("cordon", help="place no new sandbox on a node")
    cordon.add_argument("node")
    cordon.add_argument("--reason", default="")
    actions.add_parser("uncordon", help="make a node schedulable again").add_argument("node")
    drain = actions.add_parser("drain", help="empty a node (cordons it)")
    drain.add_argument("node")
    drain.add_argument("--migrate", action="store_true", help="move its sandboxes to other nodes")
    drain.add_argument("--reason", default="")
    drain.add_argument("--no-wait", action="store_true", help="without --migrate: do not wait for it to empty")


def run_nodes(args, channel: grpc.Channel) -> int:
    stub = nodes_pb2_grpc.NodeServiceStub(channel)
    try:
        if not args.action:
            for node in stub.ListNodes(nodes_pb2.ListNodesRequest(), timeout=30).nodes:
                print(describe(node))
        elif args.action == "get":
            print(describe(stub.GetNode(nodes_pb2.GetNodeRequest(name=node_name(args.node)), timeout=30).node))
        elif args.action == "cordon":
            print(
                describe(
                    stub.CordonNode(
                        nodes_pb2.CordonNodeRequest(name=node_name(args.node), reason=args.reason), timeout=30
                    ).node
                )
            )
        elif args.action == "uncordon":
            print(
                describe(stub.UncordonNode(nodes_pb2.UncordonNodeRequest(name=node_name(args.node)), timeout=30).node)
            )
        elif args.action == "drain":
            drained = stub.DrainNode(
                nodes_pb2.DrainNodeRequest(name=node_name(args.node), migrate=args.migrate, reason=args.reason),
                timeout=3600,
            )
            for name in drained.migrated:
                print(f"migrated {name.removeprefix('sandboxes/')}")
            node = drained.node
            while not args.migrate and not args.no_wait and node.sandbox_count:
                print(f"waiting for {node.sandbox_count} sandboxes to end on {args.node}", file=sys.stderr)
                time.sleep(5)
                node = stub.GetNode(nodes_pb2.GetNodeRequest(name=node_name(args.node)), timeout=30).node
            print(describe(node))
    except grpc.RpcError as error:
        print(f"mvm: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2 if error.code() == grpc.StatusCode.NOT_FOUND else 1
    return 0
