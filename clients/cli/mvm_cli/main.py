"""`mvm`: the command line for MicroVM Sandbox.

    mvm create [--template T] [--vcpus N] [--memory MiB] [--timeout S] [--label k=v]
    mvm ls [--filter labels.k=v]
    mvm get ID
    mvm exec ID [--env K=V] [--cwd DIR] [--user U] [--timeout S] [--tty] -- CMD...
    mvm run [create options] -- CMD...        (create, exec, delete)
    mvm cp SRC DST                             (one side is ID:/path)
    mvm rm ID...
    mvm pause ID / mvm resume ID
    mvm snapshot ID [--label k=v] [--ttl S]    (prints the snapshot id)
    mvm restore SNAPSHOT                       (a new sandbox from a snapshot)
    mvm fork ID [-n COUNT]                     (snapshot + COUNT independent clones)
    mvm snapshots [--sandbox ID]               (lineage as a tree)

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
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2 as api, sandbox_service_pb2_grpc

CHUNK = 1 << 20


def fail(error: grpc.RpcError) -> "NoReturn":  # noqa: F821
    print(f"mvm: {error.code().name}: {error.details()}", file=sys.stderr)
    sys.exit(1 if error.code() != grpc.StatusCode.NOT_FOUND else 2)


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
    """$MVM_API_KEY, else the admin key `make up` wrote into the state dir."""
    if key := os.environ.get("MVM_API_KEY"):
        return key.strip()
    path = Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm") / "admin.key"
    try:
        return path.read_text().strip()
    except OSError:
        sys.exit(f"mvm: no API key: set MVM_API_KEY or run `make up` (which writes {path})")


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str) -> None:
        self.metadata = ("authorization", f"Bearer {key}")

    def _with_auth(self, details):
        metadata = list(details.metadata or []) + [self.metadata]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
            details.compression)

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
    channel = grpc.insecure_channel(gateway, options=[
        ("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)])
    return grpc.intercept_channel(channel, BearerAuth(key))


class Cli:
    def __init__(self, gateway: str) -> None:
        self.channel = connect(gateway, api_key())
        self.stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)

    def create(self, args) -> sandbox_pb2.Sandbox:
        sandbox = sandbox_pb2.Sandbox(template=args.template, vcpus=args.vcpus, memory_mib=args.memory,
                                      labels=parse_pairs(args.label, "label"))
        if args.timeout:
            sandbox.timeout.CopyFrom(duration_pb2.Duration(seconds=args.timeout))
        return self.stub.CreateSandbox(api.CreateSandboxRequest(sandbox=sandbox), timeout=300).sandbox

    def exec(self, sandbox_name: str, args) -> int:
        process = api.ProcessConfig(argv=args.command, env=parse_pairs(args.env, "env"), cwd=args.cwd,
                                    user=args.user, shell=args.shell, pty=args.tty)
        if args.exec_timeout:
            process.timeout.CopyFrom(duration_pb2.Duration(seconds=args.exec_timeout))
        if args.tty and sys.stdin.isatty():
            return self._interactive(sandbox_name, process)
        stdin = b"" if sys.stdin.isatty() or args.no_stdin else sys.stdin.buffer.read()
        stream = self.stub.Exec(api.ExecRequest(sandbox=sandbox_name, process=process, stdin=stdin))
        return self._print_events(stream)

    def _print_events(self, events) -> int:
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "stdout":
                sys.stdout.buffer.write(event.stdout)
                sys.stdout.buffer.flush()
            elif kind == "stderr":
                sys.stderr.buffer.write(event.stderr)
                sys.stderr.buffer.flush()
            elif kind == "exited":
                exited = event.exited
                if exited.timed_out:
                    print("mvm: the process was killed by its timeout", file=sys.stderr)
                return 128 + exited.signal if exited.WhichOneof("status") == "signal" else exited.exit_code
        print("mvm: the stream ended without an exit status", file=sys.stderr)
        return 255

    def _interactive(self, sandbox_name: str, process: api.ProcessConfig) -> int:
        size = os.get_terminal_size()
        process.terminal_size.CopyFrom(api.TerminalSize(cols=size.columns, rows=size.lines))
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
            return self._print_events(r.event for r in self.stub.ExecInteractive(requests()))
        finally:
            stop.set()
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)

    def copy(self, source: str, target: str) -> None:
        def remote(spec: str):
            sandbox, sep, path = spec.partition(":")
            return (name_of(sandbox), path) if sep and path.startswith("/") and "/" not in sandbox else None

        src, dst = remote(source), remote(target)
        if bool(src) == bool(dst):
            sys.exit("mvm: exactly one side of cp must be SANDBOX:/absolute/path")
        if dst:
            data = Path(source).read_bytes() if source != "-" else sys.stdin.buffer.read()

            def requests():
                yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=dst[0], path=dst[1], make_parents=True))
                for offset in range(0, len(data), CHUNK):
                    yield api.WriteFileRequest(data=data[offset:offset + CHUNK])

            reply = self.stub.WriteFile(requests(), timeout=600)
            print(f"{len(data)} bytes -> {short(dst[0])}:{dst[1]} sha256 {reply.sha256}", file=sys.stderr)
        else:
            out = sys.stdout.buffer if target == "-" else open(target, "wb")
            total = 0
            for chunk in self.stub.ReadFile(api.ReadFileRequest(sandbox=src[0], path=src[1]), timeout=600):
                out.write(chunk.data)
                total += len(chunk.data)
            if out is not sys.stdout.buffer:
                out.close()
                print(f"{short(src[0])}:{src[1]} -> {target} ({total} bytes)", file=sys.stderr)


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
            lines.append(f"{'  ' * depth}{'└─ ' if depth else ''}{snapshot.name.removeprefix('snapshots/')}  "
                         f"from {short(snapshot.source_sandbox)}  {snapshot.size_bytes / 1e6:.1f} MB  "
                         f"{snapshot.create_time.ToDatetime().strftime('%H:%M:%S')}Z")
            walk(snapshot.name, depth + 1)
    walk("", 0)
    return lines


def describe(sandbox: sandbox_pb2.Sandbox) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(sandbox.labels.items()))
    return (f"{short(sandbox.name):18} {STATE[sandbox.state]:9} {sandbox.template:10} {sandbox.vcpus:>2} vCPU "
            f"{sandbox.memory_mib:>5} MiB  {sandbox.hypervisor or '-':10} node={sandbox.node or '-'} "
            f"expires={sandbox.expire_time.ToDatetime().strftime('%H:%M:%S')}Z {labels}").rstrip()


def add_create_options(parser) -> None:
    parser.add_argument("--template", default="default")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=256, help="MiB")
    parser.add_argument("--timeout", type=int, default=0, help="sandbox lifetime in seconds (default 600)")
    parser.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")


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
    parser = argparse.ArgumentParser(prog="mvm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    snapshot = sub.add_parser("snapshot", help="snapshot a sandbox (memory, devices, disk)")
    snapshot.add_argument("id")
    snapshot.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    snapshot.add_argument("--ttl", type=int, default=0, help="delete the snapshot after S seconds")
    sub.add_parser("restore", help="start a new sandbox from a snapshot").add_argument("snapshot")
    fork = sub.add_parser("fork", help="clone a running sandbox")
    fork.add_argument("id")
    fork.add_argument("-n", "--count", type=int, default=1)
    snapshots = sub.add_parser("snapshots", help="list snapshots as a lineage tree")
    snapshots.add_argument("--sandbox", default="", help="only snapshots of this sandbox")
    args = parser.parse_args(argv)
    if hasattr(args, "command") and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.verb in ("exec", "run") and not args.command:
        parser.error("a command is required after --")
    cli = Cli(args.gateway)
    try:
        if args.verb == "create":
            print(short(cli.create(args).name))
        elif args.verb == "ls":
            reply = cli.stub.ListSandboxes(api.ListSandboxesRequest(filter=args.filter, page_size=1000), timeout=30)
            for sandbox in reply.sandboxes:
                print(describe(sandbox))
        elif args.verb == "get":
            print(describe(cli.stub.GetSandbox(api.GetSandboxRequest(name=name_of(args.id)), timeout=30).sandbox))
        elif args.verb == "exec":
            sys.exit(cli.exec(name_of(args.id), args))
        elif args.verb == "run":
            sandbox = cli.create(args)
            try:
                code = cli.exec(sandbox.name, args)
            finally:
                cli.stub.DeleteSandbox(api.DeleteSandboxRequest(name=sandbox.name), timeout=60)
            sys.exit(code)
        elif args.verb == "cp":
            cli.copy(args.source, args.target)
        elif args.verb in ("pause", "resume"):
            call = cli.stub.PauseSandbox if args.verb == "pause" else cli.stub.ResumeSandbox
            request = (api.PauseSandboxRequest if args.verb == "pause" else api.ResumeSandboxRequest)(
                name=name_of(args.id))
            print(describe(call(request, timeout=60).sandbox))
        elif args.verb == "snapshot":
            request = api.CreateSnapshotRequest(sandbox=name_of(args.id), labels=parse_pairs(args.label, "label"))
            if args.ttl:
                request.ttl.CopyFrom(duration_pb2.Duration(seconds=args.ttl))
            print(cli.stub.CreateSnapshot(request, timeout=600).snapshot.name.removeprefix("snapshots/"))
        elif args.verb == "restore":
            print(short(cli.stub.RestoreSnapshot(api.RestoreSnapshotRequest(
                snapshot=snapshot_name(args.snapshot)), timeout=600).sandbox.name))
        elif args.verb == "fork":
            reply = cli.stub.ForkSandbox(api.ForkSandboxRequest(name=name_of(args.id), count=args.count), timeout=900)
            print(f"snapshot {reply.snapshot.name.removeprefix('snapshots/')}", file=sys.stderr)
            for sandbox in reply.sandboxes:
                print(short(sandbox.name))
        elif args.verb == "snapshots":
            request = api.ListSnapshotsRequest(source_sandbox=name_of(args.sandbox) if args.sandbox else "",
                                               page_size=1000)
            for line in snapshot_tree(cli.stub.ListSnapshots(request, timeout=30).snapshots):
                print(line)
        elif args.verb == "rm":
            for sandbox_id in args.ids:
                cli.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name_of(sandbox_id)), timeout=60)
                print(f"deleted {short(sandbox_id)}")
    except grpc.RpcError as error:
        fail(error)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
