"""`mvm port-forward ID [LOCAL:]GUEST...`: local TCP ports whose connections reach ports on a sandbox's loopback
(the SDK's `forward_port`, one PortForwardService call per connection), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from microvm_sandbox import SandboxError
from mvm_cli.context import Context
from mvm_cli.output import emit, error_line
from mvm_cli.parsing import CliError, command_parser


def port_mapping(text: str) -> tuple[int, int]:
    """`LOCAL:GUEST` -> (LOCAL, GUEST); `GUEST` alone listens on the same port locally; `:GUEST` or `0:GUEST` on
    a free one."""
    local, _, guest = text.rpartition(":")
    try:
        ports = (int(local or (0 if ":" in text else guest)), int(guest))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not [LOCAL:]GUEST, e.g. 8080:80 or 5900") from None
    if not (0 <= ports[0] < 65536 and 0 < ports[1] < 65536):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1..65535 (LOCAL 0: a free port)")
    return ports


def register(sub) -> None:
    forward = command_parser(
        sub,
        "port-forward",
        "forward local TCP ports to ports on a sandbox's loopback",
        "mvm port-forward sbx-1a2b3c 8080:80 5900",
        description="Listen on local ports and carry each connection to a port on the sandbox's 127.0.0.1, over the "
        "sandbox's agent channel: the guest needs no network, and servers bound to its loopback are reachable. "
        "LOCAL:GUEST listens on LOCAL; GUEST alone on the same port; :GUEST on a free one. Prints one line per "
        "mapping and runs until Ctrl-C (exit status 0). A connection that fails (nothing listens on the guest port) "
        "is reset and its error printed; the others go on.",
    )
    forward.add_argument("id", metavar="ID", help="the sandbox's id")
    forward.add_argument("mappings", nargs="+", type=port_mapping, metavar="[LOCAL:]GUEST", help="e.g. 8080:80")
    forward.add_argument("--address", default="127.0.0.1", help="the local address to listen on")
    forward.set_defaults(handler=port_forward_command)


def port_forward_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox(args.id)  # a missing sandbox says so now, not at the first connection
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    forwards = []
    try:
        for local, guest in args.mappings:
            target = f"{sandbox.id}:{guest}"

            def report(error: SandboxError, target: str = target) -> None:
                print(f"mvm: port-forward {target}: {error_line(error)}", file=sys.stderr, flush=True)

            try:
                forward = sandbox.forward_port(guest, local, args.address, on_error=report)
            except OSError as error:
                raise CliError(f"cannot listen on {args.address}:{local}: {error.strerror or error}", 1) from None
            forwards.append(forward)
            emit(f"forwarding {forward.local_address} -> {target}")
        sys.stdout.flush()
        stop.wait()
    finally:
        for forward in forwards:
            forward.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0
