"""Sandbox commands: create, ls, get, exec, run, rm, pause, resume, timeout, console (and cp, unless mvm_cli/copy.py
registers its own); expose, unexpose and egress are in mvm_cli/network.py."""

from __future__ import annotations

import argparse
import os
import sys
import termios
import threading
import tty
from pathlib import Path

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from microvm_sandbox import Exited, Sandbox, Stderr, Stdout
from microvm_sandbox.aio import STATES, sandbox_name
from mvm_cli import network
from mvm_cli.channel import connect
from mvm_cli.context import Context, for_each
from mvm_cli.output import emit, sandbox_table, sandbox_view, short, to_json, until
from mvm_cli.parsing import CliError, add_json, add_listing, command_parser, parse_duration, parse_pairs

# The commands whose trailing words are the remote command, and how many positionals come before it.
REMOTE_COMMAND = {"exec": 1, "run": 0}


def add_create_options(parser: argparse.ArgumentParser, lifetime: str = "--timeout") -> None:
    parser.add_argument("--template", default="default", metavar="NAME[:TAG]", help="template to boot")
    # No default here: the template's own size applies (a code-interpreter needs its 1 GiB), else 1 vCPU, 256 MiB.
    parser.add_argument("--vcpus", type=int, help="virtual CPUs (default: the template's, else 1)")
    parser.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default: the template's, else 256)")
    parser.add_argument(
        lifetime,
        dest="lifetime",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="lifetime: seconds or 90s, 30m, 2h (default: the server's, 10m)",
    )
    parser.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    parser.add_argument(
        "--node-selector", action="append", metavar="KEY=VALUE", help="place only on a node with this label"
    )
    network.add_egress_options(parser)


def add_exec_options(parser: argparse.ArgumentParser, env_help: str = "environment variable (repeatable)") -> None:
    parser.add_argument("--env", "-e", action="append", metavar="KEY=VALUE", help=env_help)
    parser.add_argument("--cwd", "-w", default="", metavar="DIR", help="working directory (default: /root)")
    parser.add_argument("--user", "-u", default="", help="user to run as (default: root)")
    parser.add_argument("--shell", action="store_true", help="run the command through /bin/sh -c")
    parser.add_argument("--tty", "-t", action="store_true", help="allocate a terminal (interactive)")
    parser.add_argument(
        "--timeout",
        dest="exec_timeout",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="kill the process after this long: seconds or 90s, 30m, 2h (default: no limit)",
    )
    parser.add_argument("--exec-timeout", dest="exec_timeout", type=parse_duration, help=argparse.SUPPRESS)
    parser.add_argument("--no-stdin", action="store_true", help="do not forward standard input")
    parser.add_argument("command", nargs="*", metavar="COMMAND", help="the program and its arguments, after --")


def register(sub) -> None:
    create = command_parser(
        sub,
        "create",
        "create a sandbox and print its id",
        "mvm create --memory 512 --timeout 30m --env MODE=test --label team=ml",
    )
    add_create_options(create)
    create.add_argument(
        "--env", "-e", action="append", metavar="KEY=VALUE", help="environment of every command run in it (repeatable)"
    )
    add_json(create)
    create.set_defaults(handler=create_command)

    ls = command_parser(sub, "ls", "list sandboxes", "mvm ls --label team=ml --state running", aliases=["list"])
    ls.add_argument("--label", action="append", metavar="KEY=VALUE", help="only with this label (repeatable)")
    ls.add_argument("--filter", default="", metavar="labels.K=V ...", help="the API's label filter")
    ls.add_argument("--state", choices=[s.lower() for s in STATES if s != "UNSPECIFIED"], help="only in this state")
    add_listing(ls)
    ls.set_defaults(handler=ls_command)

    get = command_parser(sub, "get", "show one sandbox", "mvm get sbx-1a2b3c --json")
    get.add_argument("id", metavar="ID", help="the sandbox's id")
    add_json(get)
    get.set_defaults(handler=get_command)

    exec_parser = command_parser(
        sub,
        "exec",
        "run a command in a sandbox",
        "mvm exec sbx-1a2b3c --env K=V --timeout 5m -- python3 -c 'print(6*7)'",
        description="Run a command in a sandbox, streaming its output; exit with its status (128+N when killed by "
        "signal N; 127 when the command does not exist; 125 when mvm itself failed, e.g. no such sandbox). Options "
        "go anywhere before the command; `--` ends them.",
        usage="mvm exec [options] ID [--] COMMAND [ARG...]",
    )
    exec_parser.add_argument("id", metavar="ID", help="the sandbox's id")
    add_exec_options(exec_parser)
    exec_parser.set_defaults(handler=exec_command)

    run = command_parser(
        sub,
        "run",
        "create a sandbox, run a command, delete the sandbox",
        "mvm run --memory 512 --timeout 10m -- python3 -c 'print(6*7)'",
        usage="mvm run [options] [--] COMMAND [ARG...]",
    )
    add_create_options(run, lifetime="--lifetime")
    add_exec_options(run)
    run.set_defaults(handler=run_command)

    rm = command_parser(sub, "rm", "delete sandboxes", "mvm rm sbx-1a2b3c sbx-4d5e6f", aliases=["delete"])
    rm.add_argument("ids", nargs="+", metavar="ID", help="sandbox ids")
    rm.set_defaults(handler=rm_command)
    for verb, text in (("pause", "stop sandboxes' vCPUs, keeping their memory"), ("resume", "resume paused sandboxes")):
        parser = command_parser(sub, verb, text, f"mvm {verb} sbx-1a2b3c sbx-4d5e6f")
        parser.add_argument("ids", nargs="+", metavar="ID", help="sandbox ids")
        parser.set_defaults(handler=pause_command, verb=verb)

    timeout = command_parser(
        sub,
        "timeout",
        "set when a sandbox is deleted, counted from now",
        "mvm timeout sbx-1a2b3c 2h",
    )
    timeout.add_argument("id", metavar="ID", help="the sandbox's id")
    timeout.add_argument("duration", type=parse_duration, metavar="DURATION", help="seconds or 90s, 30m, 2h, 1h30m")
    add_json(timeout)
    timeout.set_defaults(handler=timeout_command)

    console = command_parser(
        sub, "console", "print a sandbox's serial console log (raw)", "mvm console sbx-1a2b3c --tail 4096"
    )
    console.add_argument("id", metavar="ID", help="the sandbox's id")
    console.add_argument("--tail", type=int, default=0, metavar="BYTES", help="only the newest BYTES (0: all kept)")
    console.add_argument("--offset", type=int, default=0, help="from this console offset")
    console.add_argument("--length", type=int, default=0, metavar="BYTES", help="at most BYTES from --offset (0: all)")
    console.set_defaults(handler=console_command)

    network.register(sub)  # expose, unexpose, egress (mvm_cli/network.py)


def register_copy_fallback(sub) -> None:
    """`mvm cp` as it was, for as long as mvm_cli/copy.py does not register its own."""
    cp = command_parser(
        sub,
        "cp",
        "copy a file into or out of a sandbox (ID:/path)",
        "mvm cp ./data.csv sbx-1a2b3c:/root/data.csv",
    )
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("target", metavar="DST")
    cp.set_defaults(handler=copy_command)


# --- handlers ---------------------------------------------------------------------------------------------
def _create(ctx: Context, args, envs: dict[str, str] | None = None, lifetime: float | None = None) -> Sandbox:
    return Sandbox.create(
        args.template,
        timeout=lifetime or args.lifetime,
        vcpus=args.vcpus,
        memory_mib=args.memory,
        labels=parse_pairs(args.label, "label"),
        envs=envs,
        egress=args.egress,
        allow=args.allow or (),
        node_selector=parse_pairs(args.node_selector, "node selector"),
        client=ctx.client,
    )


def create_command(ctx: Context, args) -> int:
    sandbox = _create(ctx, args, envs=parse_pairs(args.env, "env"))
    emit(to_json(sandbox.message) if args.json else sandbox.id)
    return 0


def ls_command(ctx: Context, args) -> int:
    wanted = parse_pairs(args.label, "label")
    for term in args.filter.split():
        key, sep, value = term.removeprefix("labels.").partition("=")
        if not sep:
            raise CliError(f"filter term {term!r} is not labels.KEY=VALUE")
        wanted[key] = value
    sandboxes = ctx.client.list_sandboxes(wanted)
    if args.state:
        sandboxes = [s for s in sandboxes if s.state == STATES[args.state.upper()]]
    if args.json:
        emit(to_json(sandboxes))
    elif args.quiet:
        emit("\n".join(short(s.name) for s in sandboxes))
    else:
        emit(sandbox_table(sandboxes, header=not args.no_headers))
    return 0


def get_command(ctx: Context, args) -> int:
    message = ctx.sandbox(args.id).message
    emit(to_json(message) if args.json else sandbox_view(message))
    return 0


def exec_command(ctx: Context, args) -> int:
    return _exec(ctx, ctx.sandbox(args.id), args)


def run_command(ctx: Context, args) -> int:
    # The sandbox lives at least as long as the command may run (it is deleted right after anyway).
    lifetime = args.lifetime or (args.exec_timeout + 120 if args.exec_timeout else None)
    sandbox = _create(ctx, args, lifetime=lifetime)
    try:
        return _exec(ctx, sandbox, args)
    finally:
        sandbox.kill()


def _exec(ctx: Context, sandbox: Sandbox, args) -> int:
    if not args.command:
        raise CliError(f"mvm {args.verb}: a command is required (after --)")
    env = parse_pairs(args.env, "env")
    if args.tty and sys.stdin.isatty():
        return _interactive(ctx, sandbox.name, args, env)
    stdin = b"" if sys.stdin.isatty() or args.no_stdin else sys.stdin.buffer.read()
    command = " ".join(args.command) if args.shell else args.command
    with sandbox.exec_stream(
        command, env=env, cwd=args.cwd, user=args.user, timeout=args.exec_timeout, stdin=stdin
    ) as stream:
        for event in stream:
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


def _interactive(ctx: Context, name: str, args, env: dict[str, str]) -> int:
    """A terminal session: the one bidirectional stream, on a plain channel with the same key."""
    stub = sandbox_service_pb2_grpc.SandboxServiceStub(connect(ctx.gateway, ctx.key))
    size = os.get_terminal_size()
    process = api.ProcessConfig(
        argv=args.command,
        env=env,
        cwd=args.cwd,
        user=args.user,
        pty=True,
        terminal_size=api.TerminalSize(cols=size.columns, rows=size.lines),
    )
    if args.exec_timeout:
        process.timeout.FromSeconds(args.exec_timeout)
    stop = threading.Event()

    def requests():
        yield api.ExecInteractiveRequest(config=api.ExecInteractiveConfig(sandbox=name, process=process))
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


def rm_command(ctx: Context, args) -> int:
    def delete(sandbox_id: str) -> str:
        ctx.sandbox(sandbox_id).kill()  # looked up first: a missing one is an error here, not a no-op
        return f"deleted {short(sandbox_name(sandbox_id))}"

    return for_each(args.ids, delete, "rm")


def pause_command(ctx: Context, args) -> int:
    def change(sandbox_id: str) -> str:
        sandbox = ctx.sandbox_by_name(sandbox_id)
        sandbox.pause() if args.verb == "pause" else sandbox.resume()
        return f"{'paused' if args.verb == 'pause' else 'resumed'} {sandbox.id}"

    return for_each(args.ids, change, args.verb)


def timeout_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox_by_name(args.id)
    sandbox.set_timeout(args.duration)
    message = sandbox.message
    if args.json:
        emit(to_json(message))
    else:
        stamp = message.expire_time
        emit(f"{sandbox.id} expires at {stamp.ToDatetime().strftime('%Y-%m-%dT%H:%M:%SZ')} ({until(stamp)})")
    return 0


def console_command(ctx: Context, args) -> int:
    output = ctx.sandbox_by_name(args.id).read_console_log(tail_bytes=args.tail, offset=args.offset, length=args.length)
    sys.stdout.buffer.write(output.data)
    sys.stdout.flush()
    return 0


def copy_command(ctx: Context, args) -> int:
    def remote(spec: str):
        sandbox, sep, path = spec.partition(":")
        return (sandbox, path) if sep and path.startswith("/") and "/" not in sandbox else None

    source, target = args.source, args.target
    src, dst = remote(source), remote(target)
    if bool(src) == bool(dst):
        raise CliError("exactly one side of cp must be SANDBOX:/absolute/path")
    if dst:
        data = Path(source).read_bytes() if source != "-" else sys.stdin.buffer.read()
        ctx.sandbox_by_name(dst[0]).write(dst[1], data)
        print(f"{len(data)} bytes -> {short(sandbox_name(dst[0]))}:{dst[1]}", file=sys.stderr)
    else:
        data = ctx.sandbox_by_name(src[0]).read(src[1])
        if target == "-":
            sys.stdout.buffer.write(data)
        else:
            Path(target).write_bytes(data)
            print(f"{short(sandbox_name(src[0]))}:{src[1]} -> {target} ({len(data)} bytes)", file=sys.stderr)
    return 0
