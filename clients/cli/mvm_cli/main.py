"""`mvm`: the command line for MicroVM Sandbox.

    mvm create [--template T] [--vcpus N] [--memory MiB] [--timeout S] [--label k=v] [--node-selector k=v]
    mvm ls [--filter labels.k=v]
    mvm get ID
    mvm exec ID [--env K=V] [--cwd DIR] [--user U] [--timeout S] [--tty] -- CMD...
    mvm run [create options] -- CMD...        (create, exec, delete)
    mvm cp SRC DST                             (one side is ID:/path)
    mvm rm ID...
    mvm pause ID / mvm resume ID
    mvm console ID [--tail BYTES | --offset N [--length BYTES]]   (the serial console log, raw)
    mvm snapshot ID [--label k=v] [--ttl S]    (prints the snapshot id)
    mvm restore SNAPSHOT                       (a new sandbox from a snapshot)
    mvm fork ID [-n COUNT]                     (snapshot + COUNT independent clones)
    mvm snapshots [--sandbox ID]               (lineage as a tree)
    mvm nodes [get|cordon|uncordon|drain NODE] (the cluster's hosts; operators, see `mvm nodes -h`)

The gateway address comes from --gateway or $MVM_GATEWAY (default 127.0.0.1:50051). `exec` and `run`
stream output live and exit with the remote process's status (128+N when killed by signal N).
"""

from __future__ import annotations

import argparse
import os
import sys
import termios
import threading
import tty
from pathlib import Path

import grpc

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox import Client, Exited, NotFoundError, Sandbox, SandboxError, Stderr, Stdout
from microvm_sandbox.aio import default_api_key
from mvm_cli.nodes import add_node_commands, run_nodes


def name_of(sandbox_id: str) -> str:
    return sandbox_id if sandbox_id.startswith("sandboxes/") else f"sandboxes/{sandbox_id}"


def short(name: str) -> str:
    return name.removeprefix("sandboxes/")


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"mvm: {what} {pair!r} is not KEY=VALUE")
        result[key] = value
    return result


def api_key() -> str:
    """$MVM_API_KEY, else the admin key `make up` wrote into the state dir (the SDK's rule)."""
    try:
        return default_api_key()
    except SandboxError as error:
        sys.exit(f"mvm: {error.message}")


class BearerAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str) -> None:
        self.metadata = ("authorization", f"Bearer {key}")

    def _with_auth(self, details):
        metadata = list(details.metadata or []) + [self.metadata]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _Details(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            )
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_auth(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_auth(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def connect(gateway: str, key: str) -> grpc.Channel:
    channel = grpc.insecure_channel(
        gateway, options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    )
    return grpc.intercept_channel(channel, BearerAuth(key))


class Cli:
    """The verbs, on the SDK (one client implementation for the CLI and for programs)."""

    def __init__(self, gateway: str) -> None:
        self.key = api_key()
        self.client = Client(gateway, self.key)
        self.gateway = gateway

    def create(self, args) -> Sandbox:
        return Sandbox.create(
            args.template,
            timeout=args.timeout or None,
            vcpus=args.vcpus,
            memory_mib=args.memory,
            labels=parse_pairs(args.label, "label"),
            egress=args.egress,
            allow=args.allow or (),
            node_selector=parse_pairs(args.node_selector, "node selector"),
            client=self.client,
        )

    def exec(self, sandbox: Sandbox, args) -> int:
        if args.tty and sys.stdin.isatty():
            return self._interactive(sandbox.name, args)
        stdin = b"" if sys.stdin.isatty() or args.no_stdin else sys.stdin.buffer.read()
        command = " ".join(args.command) if args.shell else args.command
        for event in sandbox.exec_stream(
            command,
            env=parse_pairs(args.env, "env"),
            cwd=args.cwd,
            user=args.user,
            timeout=args.exec_timeout or None,
            stdin=stdin,
        ):
            if isinstance(event, Stdout):
                sys.stdout.buffer.write(event.data)
                sys.stdout.buffer.flush()
            elif isinstance(event, Stderr):
                sys.stderr.buffer.write(event.data)
                sys.stderr.buffer.flush()
            elif isinstance(event, Exited):
                if event.timed_out:
                    print("mvm: the process was killed by its timeout", file=sys.stderr)
                return 128 + event.signal if event.signal else event.exit_code or 0
        print("mvm: the stream ended without an exit status", file=sys.stderr)
        return 255

    def _interactive(self, sandbox_name: str, args) -> int:
        """A terminal session: the one bidirectional stream, kept on a plain channel with the same key."""
        stub = sandbox_service_pb2_grpc.SandboxServiceStub(connect(self.gateway, self.key))
        size = os.get_terminal_size()
        process = api.ProcessConfig(
            argv=args.command,
            env=parse_pairs(args.env, "env"),
            cwd=args.cwd,
            user=args.user,
            pty=True,
            terminal_size=api.TerminalSize(cols=size.columns, rows=size.lines),
        )
        stop = threading.Event()

        def requests():
            yield api.ExecInteractiveRequest(config=api.ExecInteractiveConfig(sandbox=sandbox_name, process=process))
            while not stop.is_set():
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    yield api.ExecInteractiveRequest(close_stdin=api.CloseStdin())
                    return
                yield api.ExecInteractiveRequest(stdin=data)

        saved = termios.tcgetattr(sys.stdin)
        tty.setraw(sys.stdin)
        try:
            for response in stub.ExecInteractive(requests()):
                event = response.event
                if event.stdout:
                    sys.stdout.buffer.write(event.stdout)
                    sys.stdout.buffer.flush()
                if event.HasField("exited"):
                    exited = event.exited
                    return 128 + exited.signal if exited.WhichOneof("status") == "signal" else exited.exit_code
            return 255
        finally:
            stop.set()
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)

    def copy(self, source: str, target: str) -> None:
        def remote(spec: str):
            sandbox, sep, path = spec.partition(":")
            return (sandbox, path) if sep and path.startswith("/") and "/" not in sandbox else None

        src, dst = remote(source), remote(target)
        if bool(src) == bool(dst):
            sys.exit("mvm: exactly one side of cp must be SANDBOX:/absolute/path")
        if dst:
            data = Path(source).read_bytes() if source != "-" else sys.stdin.buffer.read()
            Sandbox.connect(dst[0], client=self.client).write(dst[1], data)
            print(f"{len(data)} bytes -> {short(name_of(dst[0]))}:{dst[1]}", file=sys.stderr)
        else:
            data = Sandbox.connect(src[0], client=self.client).read(src[1])
            if target == "-":
                sys.stdout.buffer.write(data)
            else:
                Path(target).write_bytes(data)
                print(f"{short(name_of(src[0]))}:{src[1]} -> {target} ({len(data)} bytes)", file=sys.stderr)


STATE = {v: k.removeprefix("SANDBOX_STATE_") for k, v in sandbox_pb2.SandboxState.items()}


def snapshot_name(snapshot_id: str) -> str:
    return snapshot_id if snapshot_id.startswith("snapshots/") else f"snapshots/{snapshot_id}"


def snapshot_tree(snapshots) -> list[str]:
    """Lineage as an indented tree: children under the snapshot their source was restored from."""
    by_name = {s.name: s for s in snapshots}
    children: dict[str, list] = {}
    for snapshot in snapshots:
        parent = snapshot.parent_snapshot if snapshot.parent_snapshot in by_name else ""
        children.setdefault(parent, []).append(snapshot)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for snapshot in sorted(children.get(parent, []), key=lambda s: s.create_time.ToNanoseconds()):
            lines.append(
                f"{'  ' * depth}{'└─ ' if depth else ''}{snapshot.name.removeprefix('snapshots/')}  "
                f"from {short(snapshot.source_sandbox)}  {snapshot.size_bytes / 1e6:.1f} MB  "
                f"{snapshot.create_time.ToDatetime().strftime('%H:%M:%S')}Z"
            )
            walk(snapshot.name, depth + 1)

    walk("", 0)
    return lines


def describe(sandbox: sandbox_pb2.Sandbox) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(sandbox.labels.items()))
    return (
        f"{short(sandbox.name):18} {STATE[sandbox.state]:9} {sandbox.template:10} {sandbox.vcpus:>2} vCPU "
        f"{sandbox.memory_mib:>5} MiB  {sandbox.hypervisor or '-':10} node={sandbox.node or '-'} "
        f"expires={sandbox.expire_time.ToDatetime().strftime('%H:%M:%S')}Z {network(sandbox)} {labels}"
    ).rstrip()


def network(sandbox: sandbox_pb2.Sandbox) -> str:
    """`ip=10.213.0.2 egress=allow-list(203.0.113.0/24:443) ports=127.0.0.1:41000->80`."""
    if not sandbox.ip_address:
        return "net=off"
    mode = sandbox_pb2.EgressMode.Name(sandbox.network_policy.egress or 1).removeprefix("EGRESS_MODE_").lower()
    rules = ",".join(
        r.cidr + (":" + "+".join(map(str, r.ports)) if r.ports else "") for r in sandbox.network_policy.allow
    )
    ports = ",".join(f"{p.host_address}:{p.host_port}->{p.guest_port}" for p in sandbox.exposed_ports)
    return (
        f"ip={sandbox.ip_address} egress={mode.replace('_', '-')}"
        + (f"({rules})" if rules else "")
        + (f" ports={ports}" if ports else "")
    )


def add_egress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--egress",
        choices=["none", "full", "allow-list"],
        default=None,
        help="outbound network: none (default), full, or allow-list (see --allow)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        metavar="CIDR[:PORTS]",
        help="allowed destination, e.g. 203.0.113.0/24:80,443 (repeatable; implies allow-list)",
    )


def add_create_options(parser) -> None:
    parser.add_argument("--template", default="default")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=256, help="MiB")
    parser.add_argument("--timeout", type=int, default=0, help="sandbox lifetime in seconds (default 600)")
    parser.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    parser.add_argument(
        "--node-selector",
        action="append",
        metavar="KEY=VALUE",
        help="place only on a node with this label (repeatable)",
    )
    add_egress_options(parser)


def add_exec_options(parser) -> None:
    parser.add_argument("--env", action="append", help="KEY=VALUE (repeatable)")
    parser.add_argument("--cwd", default="")
    parser.add_argument("--user", default="")
    parser.add_argument("--shell", action="store_true", help="run the command through /bin/sh -c")
    parser.add_argument("--tty", "-t", action="store_true", help="allocate a terminal (interactive)")
    parser.add_argument("--exec-timeout", type=int, default=0, help="kill the process after S seconds")
    parser.add_argument("--no-stdin", action="store_true", help="do not forward standard input")
    parser.add_argument("command", nargs=argparse.REMAINDER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mvm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default=os.environ.get("MVM_GATEWAY", "127.0.0.1:50051"))
    sub = parser.add_subparsers(dest="verb", required=True)
    add_create_options(sub.add_parser("create", help="create a sandbox and print its id"))
    ls = sub.add_parser("ls", help="list sandboxes")
    ls.add_argument("--filter", default="")
    sub.add_parser("get", help="show one sandbox").add_argument("id")
    exec_parser = sub.add_parser("exec", help="run a command in a sandbox")
    exec_parser.add_argument("id")
    add_exec_options(exec_parser)
    run = sub.add_parser("run", help="create a sandbox, run a command, delete the sandbox")
    add_create_options(run)
    add_exec_options(run)
    cp = sub.add_parser("cp", help="copy a file into or out of a sandbox (ID:/path)")
    cp.add_argument("source")
    cp.add_argument("target")
    sub.add_parser("rm", help="delete sandboxes").add_argument("ids", nargs="+")
    sub.add_parser("pause", help="stop a sandbox's vCPUs, keeping its memory").add_argument("id")
    sub.add_parser("resume", help="resume a paused sandbox").add_argument("id")
    console = sub.add_parser("console", help="print a sandbox's serial console log (default: all its node keeps)")
    console.add_argument("id")
    console.add_argument("--tail", type=int, default=0, metavar="BYTES", help="only the newest BYTES")
    console.add_argument("--offset", type=int, default=0, help="from this console offset")
    console.add_argument("--length", type=int, default=0, metavar="BYTES", help="at most BYTES from --offset")
    snapshot = sub.add_parser("snapshot", help="snapshot a sandbox (memory, devices, disk)")
    snapshot.add_argument("id")
    snapshot.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    snapshot.add_argument("--ttl", type=int, default=0, help="delete the snapshot after S seconds")
    sub.add_parser("restore", help="start a new sandbox from a snapshot").add_argument("snapshot")
    fork = sub.add_parser("fork", help="clone a running sandbox")
    fork.add_argument("id")
    fork.add_argument("-n", "--count", type=int, default=1)
    expose = sub.add_parser("expose", help="make a guest port reachable on the sandbox's host")
    expose.add_argument("id")
    expose.add_argument("guest_port", type=int)
    expose.add_argument("--host-port", type=int, default=0, help="default: a free port of the node's range")
    expose.add_argument("--host-address", default="", help="default: 127.0.0.1")
    unexpose = sub.add_parser("unexpose", help="stop exposing a guest port on the sandbox's host")
    unexpose.add_argument("id")
    unexpose.add_argument("guest_port", type=int)
    unexpose.add_argument("--host-port", type=int, default=0, help="only this host port (default: any)")
    unexpose.add_argument("--host-address", default="", help="only this host address (default: any)")
    egress = sub.add_parser("egress", help="replace a sandbox's outbound network policy")
    egress.add_argument("id")
    add_egress_options(egress)
    snapshots = sub.add_parser("snapshots", help="list snapshots as a lineage tree")
    snapshots.add_argument("--sandbox", default="", help="only snapshots of this sandbox")
    add_node_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "command") and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.verb in ("exec", "run") and not args.command:
        parser.error("a command is required after --")
    cli = Cli(args.gateway)
    if args.verb == "nodes":
        sys.exit(run_nodes(args, connect(args.gateway, cli.key)))
    try:
        if args.verb == "create":
            print(cli.create(args).id)
        elif args.verb == "ls":
            wanted = dict(term.removeprefix("labels.").split("=", 1) for term in args.filter.split())
            for sandbox in cli.client.list_sandboxes(wanted):
                print(describe(sandbox))
        elif args.verb == "get":
            print(describe(Sandbox.connect(args.id, client=cli.client).aio.message))
        elif args.verb == "exec":
            sys.exit(cli.exec(Sandbox.connect(args.id, client=cli.client), args))
        elif args.verb == "run":
            sandbox = cli.create(args)
            try:
                code = cli.exec(sandbox, args)
            finally:
                sandbox.kill()
            sys.exit(code)
        elif args.verb == "cp":
            cli.copy(args.source, args.target)
        elif args.verb == "console":
            output = Sandbox.connect(args.id, client=cli.client).read_console_log(
                tail_bytes=args.tail, offset=args.offset, length=args.length
            )
            sys.stdout.buffer.write(output.data)
            sys.stdout.flush()
        elif args.verb in ("pause", "resume"):
            sandbox = Sandbox.connect(args.id, client=cli.client)
            sandbox.pause() if args.verb == "pause" else sandbox.resume()
            print(describe(sandbox.aio.message))
        elif args.verb == "snapshot":
            print(
                Sandbox.connect(args.id, client=cli.client)
                .snapshot(parse_pairs(args.label, "label"), ttl=args.ttl or None)
                .id
            )
        elif args.verb == "restore":
            print(Sandbox.restore(args.snapshot, client=cli.client).id)
        elif args.verb == "fork":
            for clone in Sandbox.connect(args.id, client=cli.client).fork(args.count):
                print(clone.id)
        elif args.verb == "snapshots":
            for line in snapshot_tree(cli.client.list_snapshots(args.sandbox)):
                print(line)
        elif args.verb == "expose":
            port = Sandbox.connect(args.id, client=cli.client).expose_port(
                args.guest_port, args.host_port, args.host_address
            )
            print(f"{port.host_address}:{port.host_port} -> {short(name_of(args.id))}:{port.guest_port}")
        elif args.verb == "unexpose":
            for port in Sandbox.connect(args.id, client=cli.client).unexpose_port(
                args.guest_port, args.host_port, args.host_address
            ):
                print(f"closed {port.host_address}:{port.host_port} -> {short(name_of(args.id))}:{port.guest_port}")
        elif args.verb == "egress":
            sandbox = Sandbox.connect(args.id, client=cli.client)
            sandbox.set_egress(args.egress, args.allow or ())
            print(describe(sandbox.aio.message))
        elif args.verb == "rm":
            for sandbox_id in args.ids:
                Sandbox.connect(sandbox_id, client=cli.client).kill()
                print(f"deleted {short(name_of(sandbox_id))}")
    except SandboxError as error:
        print(f"mvm: {error.code}: {error.message}", file=sys.stderr)
        sys.exit(2 if isinstance(error, NotFoundError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
