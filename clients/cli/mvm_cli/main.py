"""mvm: the command line for MicroVM Sandbox.

  sandboxes   create, ls, get, exec, run, cp, rm, pause, resume, timeout, console, expose, unexpose, egress
  ports       port-forward ID [LOCAL:]GUEST... (local ports to ports on the sandbox's loopback)
  processes   exec ID --background, ps ID, attach ID PID, kill ID PID
  code        code ID [FILE|-] (a kernel that keeps state), code-context [ls|create|restart|interrupt|rm]
  desktop     desktop ID screenshot|click|move|drag|type|press|scroll|launch|windows|focus|close|wait|record
  usage       metrics ID [-f] (CPU, memory, disk, network), top (your sandboxes by use, live)
  logs        logs SERVICE [-f] (this host's service logs), logs --sandbox ID [-f] (its console)
  status      the gateway's health; on this host each service's and its dependencies'
  events      events [-f] [--since CURSOR] [--type T] [--label K=V], webhooks [list|create|delete|deliveries]
  snapshots   snapshot ID, snapshots [ls|get|rm], restore SNAPSHOT, fork ID
  templates   template build, template [ls|show|rm|logs]
  cluster     nodes [get|cordon|uncordon|drain] (operators)
  keys        keys create [--tenant T] [--role R] [--e2b-format] (operators, on the installation's host)
  shell       completion bash|zsh

Options go anywhere before `--`; `mvm COMMAND -h` shows a command's options, defaults and an example. The
gateway is --gateway, else $MVM_GATEWAY, else 127.0.0.1:50051; the API key $MVM_API_KEY, else the one `make up`
wrote ($MVM_STATE_DIR/admin.key). `exec` and `run` stream output live and exit with the remote process's status
(128+N when killed by signal N; 127: the command does not exist; 125: mvm itself failed). Listing and show
commands take --json. Errors are one line `mvm: ...` (--debug adds the traceback); exit status 2 when something
is missing or misused, 1 for other failures.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from microvm_sandbox import CommandNotFound
from mvm_cli import (
    code,
    completion,
    desktop,
    events,
    keys,
    logs,
    nodes,
    port_forward,
    processes,
    sandboxes,
    snapshots,
    status,
    templates,
    usage,
)
from mvm_cli.channel import BearerAuth, connect
from mvm_cli.context import Context
from mvm_cli.output import error_line, exit_status
from mvm_cli.parsing import (
    GLOBAL_HELP,
    HelpFormatter,
    find_command,
    gateway_default,
    split_remote_command,
)

try:  # `mvm cp` lives in its own module once there is one: it registers the command with `register(sub)`.
    from mvm_cli import copy as copy_commands
except ImportError:  # pragma: no cover - until mvm_cli/copy.py exists
    copy_commands = None

__all__ = ["BearerAuth", "build_parser", "connect", "main", "parse", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command registers its own parser with a handler(ctx, args) -> status."""
    parser = argparse.ArgumentParser(
        prog="mvm",
        description=__doc__.split("\n", 1)[1],
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        epilog="example:\n  ID=$(mvm create --env MODE=test) && mvm exec $ID -- uname -a && mvm rm $ID",
    )
    parser.add_argument("--gateway", default=gateway_default(), metavar="HOST:PORT", help=GLOBAL_HELP["--gateway"])
    parser.add_argument("--debug", action="store_true", help=GLOBAL_HELP["--debug"])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    sandboxes.register(sub)
    processes.register(sub)  # after sandboxes: it adds --background to their `exec`
    port_forward.register(sub)
    code.register(sub)
    desktop.register(sub)
    usage.register(sub)
    logs.register(sub)
    status.register(sub)
    events.register(sub)
    if copy_commands is not None and hasattr(copy_commands, "register"):
        copy_commands.register(sub)
    else:
        sandboxes.register_copy_fallback(sub)
    snapshots.register(sub)
    templates.register(sub)
    nodes.register(sub)
    keys.register(sub)
    completion.register(sub)
    return parser


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The arguments of a command line. For `exec` and `run` the remote command is split off first (see
    parsing.split_remote_command), so their options may follow the sandbox id."""
    parser = parser or build_parser()
    at = find_command(parser, argv)
    if at is not None and argv[at] in sandboxes.REMOTE_COMMAND:
        own = _subcommand(parser, argv[at])
        head, command = split_remote_command(own, argv[at + 1 :], sandboxes.REMOTE_COMMAND[argv[at]])
        args = parser.parse_args(argv[: at + 1] + head)
        args.command = command
        return args
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """Runs one command line; returns its exit status."""
    parser = build_parser()
    args = parse(list(sys.argv[1:] if argv is None else argv), parser)
    if args.verb == "completion":
        print(completion.bash_script(parser) if args.shell == "bash" else completion.zsh_script(parser), end="")
        return 0
    ctx = Context(args.gateway)
    try:
        return args.handler(ctx, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mvm ls | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"mvm: {error_line(error, ctx.gateway)}", file=sys.stderr)
        if args.verb in sandboxes.REMOTE_COMMAND:
            # As `docker run` does: the remote command's own status stays distinguishable from mvm's failures.
            return 127 if isinstance(error, CommandNotFound) else 125
        return exit_status(error)
    finally:
        try:
            ctx.close()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> None:
    """The `mvm` entry point: returns on success, exits with the status otherwise."""
    status = run(argv)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
