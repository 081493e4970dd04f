"""`mvm keys create`: another API key of a tenant (operators, on the host that runs the installation).

Keys are the auth service's, whose key management is internal (mutual TLS with the operator certificate of the
installation's PKI), so this runs `mvm-supervisor create-key` on this host, as `mvm status` runs its status. The key
is printed once on stdout. `--e2b-format` mints it as `e2b_` + 40 lowercase hex, the form the E2B SDKs expect
(docs/e2b.md); it works wherever an `mvm_` key does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mvm_cli.context import Context
from mvm_cli.parsing import command_parser


def register(sub) -> None:
    keys = command_parser(
        sub,
        "keys",
        "create API keys (operators, on the installation's host)",
        "mvm keys create --tenant default --role developer --e2b-format",
        description=__doc__,
    )
    actions = keys.add_subparsers(dest="action", metavar="{create}", required=True)
    create = command_parser(actions, "create", "a new API key, printed once", "mvm keys create --e2b-format")
    create.add_argument("--tenant", default="default", help="the key's tenant")
    create.add_argument("--principal", default="", help="who the key acts as (default: key-<id>)")
    create.add_argument("--role", choices=["admin", "developer", "viewer"], default="developer", help="what it may do")
    create.add_argument("--e2b-format", action="store_true", help="`e2b_` + 40 hex, for the E2B SDKs")
    create.set_defaults(handler=keys_command)


def supervisor_argv(args, state_dir: Path) -> list[str]:
    """The `mvm-supervisor create-key` command line of `mvm keys create` with `args`."""
    argv = [sys.executable, "-m", "services.supervisor.main", "create-key", "--state-dir", str(state_dir)]
    argv += ["--tenant", args.tenant, "--principal", args.principal, "--key-role", args.role]
    return argv + (["--e2b-format"] if args.e2b_format else [])


def keys_command(ctx: Context, args) -> int:
    state_dir = Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm")
    if not (state_dir / "supervisor.json").exists():
        print(
            f"mvm: keys are made on the host that runs the installation ({state_dir}/supervisor.json not found; "
            "set MVM_STATE_DIR)",
            file=sys.stderr,
        )
        return 2
    made = subprocess.run(supervisor_argv(args, state_dir), capture_output=True, text=True, timeout=60)
    sys.stdout.write(made.stdout)
    sys.stderr.write(made.stderr)
    return made.returncode
