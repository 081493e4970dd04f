"""Background processes: `mvm exec ID --background -- CMD` starts one and prints its pid; `mvm ps ID` lists them,
`mvm attach ID PID` follows one (Ctrl-C detaches, the process runs on), `mvm kill ID PID` signals one. They belong
to the sandbox, not to a call: they run on when mvm exits (docs/processes.md)."""

from __future__ import annotations

import argparse
import signal as signals
import sys

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox import Exited, Stderr, Stdout
from microvm_sandbox.aio import sandbox_name
from mvm_cli.context import Context
from mvm_cli.output import ago, emit, table, to_json
from mvm_cli.parsing import CliError, add_listing, command_parser, parse_pairs

COLUMNS = ("PID", "TAG", "STATUS", "STARTED", "OUTPUT", "COMMAND")
GUEST_BUFFER = 1 << 20  # the newest output the guest keeps of each background process


def signal_number(text: str) -> int:
    """9 for `9`, `KILL`, `SIGKILL` or `kill`. For argparse `type=`."""
    value = text.strip().upper()
    if value.isdigit():
        return int(value)
    try:
        return int(signals.Signals[value if value.startswith("SIG") else f"SIG{value}"])
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal: use a number or a name such as TERM") from None


def signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def register(sub) -> None:
    """Adds --background and --tag to `mvm exec` (registered before) and the ps, attach and kill commands."""
    exec_parser = sub.choices.get("exec")
    if exec_parser is not None:
        exec_parser.add_argument(
            "--background",
            "-d",
            action="store_true",
            help="start it in the background, print its pid and return (it runs on: mvm ps, attach, kill)",
        )
        exec_parser.add_argument("--tag", default="", help="with --background: a name for it, shown by mvm ps")
        foreground = exec_parser.get_default("handler")

        def exec_or_start(ctx: Context, args) -> int:
            return start_command(ctx, args) if args.background else foreground(ctx, args)

        exec_parser.set_defaults(handler=exec_or_start)

    ps = command_parser(sub, "ps", "list a sandbox's background processes", "mvm ps sbx-1a2b3c --json")
    ps.add_argument("id", metavar="ID", help="the sandbox's id")
    add_listing(ps, "pids")
    ps.set_defaults(handler=ps_command)

    attach = command_parser(
        sub,
        "attach",
        "follow a background process's output",
        "mvm attach sbx-1a2b3c 42 --tail 4096",
        description="Print a background process's output as it comes (stdout to stdout, stderr to stderr) and exit "
        "with its status (128+N when killed by signal N) once it ends. Ctrl-C only detaches: the process runs on.",
    )
    attach.add_argument("id", metavar="ID", help="the sandbox's id")
    attach.add_argument("pid", type=int, metavar="PID", help="the process's pid (mvm ps)")
    attach.add_argument(
        "--tail",
        type=int,
        default=0,
        metavar="BYTES",
        help=f"first replay up to BYTES of its newest output (at most {GUEST_BUFFER}; 0: only what comes next)",
    )
    attach.set_defaults(handler=attach_command)

    kill = command_parser(
        sub,
        "kill",
        "send a signal to a background process",
        "mvm kill sbx-1a2b3c 42 --signal TERM",
        description="Send a signal to a background process: KILL (9) unless --signal says otherwise.",
    )
    kill.add_argument("id", metavar="ID", help="the sandbox's id")
    kill.add_argument("pid", type=int, metavar="PID", help="the process's pid (mvm ps)")
    kill.add_argument(
        "--signal", "-s", type=signal_number, default=9, metavar="SIGNAL", help="a number or a name (TERM, INT, ...)"
    )
    kill.set_defaults(handler=kill_command)


# --- handlers ---------------------------------------------------------------------------------------------
def start_command(ctx: Context, args) -> int:
    if not args.command:
        raise CliError("mvm exec: a command is required (after --)")
    if args.tty:
        raise CliError("mvm exec: --background has no terminal (--tty): use mvm attach to follow its output")
    command = " ".join(args.command) if args.shell else args.command
    info = ctx.sandbox_by_name(args.id).commands.start(
        command,
        envs=parse_pairs(args.env, "env"),
        cwd=args.cwd,
        user=args.user,
        timeout=args.exec_timeout,
        tag=args.tag,
    )
    emit(str(info.pid))
    return 0


def status_text(process: api.ProcessInfo) -> str:
    """`running`, `exited 0`, `killed (SIGTERM)`, `timed out`."""
    if process.running:
        return "running"
    if process.exited.timed_out:
        return "timed out"
    if process.exited.WhichOneof("status") == "signal":
        return f"killed ({signal_name(process.exited.signal)})"
    return f"exited {process.exited.exit_code}"


def bytes_text(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count}B"


def process_row(process: api.ProcessInfo, now: float | None = None) -> list[object]:
    return [
        process.pid,
        process.tag or "-",
        status_text(process),
        ago(process.start_time, now),
        bytes_text(process.output_bytes),
        " ".join(process.argv),
    ]


def process_table(processes, header: bool = True, now: float | None = None) -> str:
    return table(COLUMNS, [process_row(p, now) for p in processes], header)


def ps_command(ctx: Context, args) -> int:
    request = api.ListProcessesRequest(sandbox=sandbox_name(args.id))
    processes = list(ctx.client.call("ListProcesses", request, idempotent=True).processes)
    if args.json:
        emit(to_json(processes))
    elif args.quiet:
        emit("\n".join(str(p.pid) for p in processes))
    else:
        emit(process_table(processes, header=not args.no_headers))
    return 0


def attach_command(ctx: Context, args) -> int:
    handle = ctx.sandbox_by_name(args.id).commands.connect(args.pid, tail_bytes=args.tail)
    try:
        for event in handle:
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
    except KeyboardInterrupt:
        handle.disconnect()
        print(f"\nmvm: detached; process {args.pid} runs on (mvm attach {args.id} {args.pid})", file=sys.stderr)
        return 130
    handle.wait()  # raises what ended the stream
    return 255


def kill_command(ctx: Context, args) -> int:
    process = ctx.sandbox_by_name(args.id).commands.signal(args.pid, args.signal)
    if not process.running:
        emit(f"{args.pid} had already ended")
    else:
        emit(
            f"killed {args.pid}" if args.signal == signals.SIGKILL else f"sent {signal_name(args.signal)} to {args.pid}"
        )
    return 0
