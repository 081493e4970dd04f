"""The code-interpreter template's ready check: exits 0 once the code server answers a warm-up run in the default
Python context (see mvm_code_server.py, op `warm`), 1 otherwise. compute runs it when it builds the template
snapshot and again in every pooled sandbox after its restore, so that the whole run path (code server, jupyter
client, ZeroMQ, the kernel) has run once in that VM before a user's first run_code.

    python3 mvm_code_ready.py [--socket /run/mvm-code.sock]
"""

import argparse
import json
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default="/run/mvm-code.sock")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(args.timeout)
            connection.connect(args.socket)
            connection.sendall(b'{"op": "warm"}\n')
            reply = json.loads(connection.makefile("rb").readline() or b"null")
    except (OSError, ValueError) as error:
        print(f"mvm-code-ready: {error}", file=sys.stderr)
        return 1
    if not isinstance(reply, dict) or reply.get("type") != "warmed":
        print(f"mvm-code-ready: {reply}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
