"""`mvm-supervisor`: runs the local stack (etcd + the six services) under one process.

mvm-supervisor run     foreground: start etcd and every service, restart crashed ones with back-off
mvm-supervisor start   the same, detached; returns once every service is SERVING
mvm-supervisor stop    stop everything it started (services, VMs, etcd); no process is left behind
mvm-supervisor status  health of every registered service
mvm-supervisor create-key  another API key (`mvm keys create`): --tenant, --principal, --key-role, --e2b-format
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common.config import ConfigError, load_config
from services.common.registry import etcd_identity
from services.common.settings import SupervisorSettings
from services.common.tasks import process_alive
from services.supervisor.bootstrap import bootstrap_admin_key, create_api_key
from services.supervisor.stack import ROLES, StackSupervisor, check_stack_health


def _state_dir(args) -> Path:
    return Path(args.state_dir or os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm").resolve()


def _load(args):
    state_dir = _state_dir(args)
    os.environ["MVM_STATE_DIR"] = str(state_dir)
    config = load_config(args.config, "supervisor", SupervisorSettings)
    return state_dir, config


def _read_pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _endpoints(args, config) -> list[str]:
    """Where this supervisor's services find etcd: its own (role all) or the configured one."""
    run_etcd = args.role == "all" if args.etcd is None else args.etcd
    if run_etcd:
        return [f"127.0.0.1:{config.service.etcd_client_port}"]
    return config.common.etcd_endpoints


def _node(args, config) -> str | None:
    """Node services are checked on this node only (every node runs its own)."""
    return config.common.node if args.role in ("all", "node") else None


def cmd_run(args) -> int:
    state_dir, config = _load(args)
    supervisor = StackSupervisor(state_dir, config, config_path=args.config, role=args.role, run_etcd=args.etcd)
    return asyncio.run(supervisor.run())


def cmd_start(args) -> int:
    state_dir, _config = _load(args)
    if pid := _read_pid(state_dir):
        print(f"already running (supervisor pid {pid}, state dir {state_dir})")
        return 0
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "services.supervisor.main",
        "run",
        "--state-dir",
        str(state_dir),
        "--role",
        args.role,
    ]
    if args.etcd is not None:
        command.append("--etcd" if args.etcd else "--no-etcd")
    if args.config:
        command += ["--config", str(Path(args.config).resolve())]
    with open(state_dir / "logs" / "supervisor.log", "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/"
        )
    (state_dir / "supervisor.pid").write_text(str(process.pid))
    print(f"supervisor started (pid {process.pid}); logs in {state_dir / 'logs'}")
    return cmd_wait(args)


def cmd_wait(args) -> int:
    state_dir, config = _load(args)
    deadline = time.monotonic() + args.timeout
    report = {}
    while time.monotonic() < deadline:
        if not _read_pid(state_dir):
            print("supervisor is not running; see", state_dir / "logs" / "supervisor.log", file=sys.stderr)
            return 1
        try:
            identity = etcd_identity(config.common, "operator")
        except ConfigError as exc:
            # A new installation: the supervisor just started makes its certificates first.
            report = {"certificates": str(exc)}
            time.sleep(0.3)
            continue
        report = asyncio.run(
            check_stack_health(
                _endpoints(args, config),
                pki_dir=config.common.pki_path,
                node=_node(args, config),
                etcd_identity=identity,
            )
        )
        kinds = ROLES[args.role]
        if all(report.get(kind) == "SERVING" for kind in kinds) and (
            "auth" not in kinds or (state_dir / "admin.key").exists()
        ):
            print("all services SERVING")
            return 0
        time.sleep(0.3)
    print("timed out waiting for services:", json.dumps(report), file=sys.stderr)
    return 1


def cmd_stop(args) -> int:
    state_dir = _state_dir(args)
    pid = _read_pid(state_dir)
    if not pid:
        print("not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        print(f"supervisor {pid} did not stop in {args.timeout}s; killing its process group", file=sys.stderr)
        os.killpg(pid, signal.SIGKILL)
    print("stopped")
    return 0


def cmd_status(args) -> int:
    state_dir, config = _load(args)
    pid = _read_pid(state_dir)
    print(f"supervisor: {'running, pid ' + str(pid) if pid else 'not running'} (state dir {state_dir})")
    report = asyncio.run(
        check_stack_health(
            _endpoints(args, config),
            detailed=True,
            pki_dir=config.common.pki_path,
            node=_node(args, config),
            etcd_identity=etcd_identity(config.common, "operator"),
        )
    )
    for kind in ROLES[args.role]:
        print(f"  {kind:9} {report.get(kind, 'NOT REGISTERED')}")
    return 0 if all(str(report.get(k, "")).startswith("SERVING") for k in ROLES[args.role]) else 1


def cmd_admin_key(args) -> int:
    """The first admin API key of an installation run without `make up` (systemd units, Kubernetes): needs etcd
    and an auth service up, and the operator certificate in the PKI directory."""
    state_dir, config = _load(args)
    key_file = state_dir / "admin.key"
    pki = config.common.pki_path if config.common.internal_tls else None
    created = bootstrap_admin_key(
        config.common.etcd_endpoints, pki, key_file, etcd_identity=etcd_identity(config.common, "operator")
    )
    if not asyncio.run(created):
        print(f"{key_file} exists already: the installation has its first admin key", file=sys.stderr)
        return 1
    print(f"admin API key written to {key_file} (mode 0600)")
    return 0


def cmd_create_key(args) -> int:
    """Another API key of a tenant, printed once on stdout (the operator's, on a host with the installation's PKI)."""
    from microvm.auth.v1 import auth_pb2
    from microvm.types.v1 import auth_pb2 as auth_types

    _, config = _load(args)
    request = auth_pb2.CreateApiKeyRequest(
        tenant=args.tenant,
        principal=args.principal,
        role=auth_types.Role.Value(f"ROLE_{args.key_role.upper()}"),
        e2b_format=args.e2b_format,
    )
    pki = config.common.pki_path if config.common.internal_tls else None
    created = asyncio.run(
        create_api_key(_endpoints(args, config), pki, request, etcd_identity=etcd_identity(config.common, "operator"))
    )
    print(created.secret)
    print(f"key id {created.key_id} (tenant {args.tenant}, {args.key_role})", file=sys.stderr)
    return 0


def cmd_banner(args) -> int:
    state_dir, config = _load(args)
    report = asyncio.run(
        check_stack_health(
            _endpoints(args, config),
            detailed=True,
            pki_dir=config.common.pki_path,
            etcd_identity=etcd_identity(config.common, "operator"),
        )
    )
    gateway = str(report.get("gateway", "")).partition(" at ")[2].split(" ")[0] or "127.0.0.1:50051"
    print(f"""
MicroVM Sandbox is up. Gateway (gRPC): {gateway}   state dir: {state_dir}
  Admin API key (mode 0600, shown nowhere else): {state_dir / "admin.key"}
  grpcurl -plaintext -H "authorization: Bearer $(cat {state_dir / "admin.key"})" {gateway} list
  grpcurl -plaintext {gateway} describe microvm.sandbox.v1.SandboxService
  .venv/bin/mvm run -- python3 -c 'print(6*7)'
  make status | make down
""")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mvm-supervisor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command", choices=["run", "start", "stop", "status", "wait", "banner", "admin-key", "create-key"]
    )
    parser.add_argument("--state-dir", help="default: $MVM_STATE_DIR or ~/.microvm")
    parser.add_argument("--config", help="installation config file (YAML)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for start/wait/stop")
    parser.add_argument(
        "--role",
        choices=sorted(ROLES),
        default="all",
        help="all: etcd and every service (one host); node: compute, network, relay, snapshot of this "
        "host; control: gateway and auth",
    )
    parser.add_argument(
        "--etcd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a local single-member etcd (default: only with --role all)",
    )
    keys = parser.add_argument_group("create-key")
    keys.add_argument("--tenant", default="default", help="the key's tenant (default: default)")
    keys.add_argument("--principal", default="", help="who the key acts as (default: key-<id>)")
    keys.add_argument("--key-role", choices=["admin", "developer", "viewer"], default="developer")
    keys.add_argument("--e2b-format", action="store_true", help="`e2b_` + 40 hex, for the E2B SDKs (docs/e2b.md)")
    args = parser.parse_args(argv)
    commands = {
        "run": cmd_run,
        "start": cmd_start,
        "stop": cmd_stop,
        "status": cmd_status,
        "wait": cmd_wait,
        "banner": cmd_banner,
        "admin-key": cmd_admin_key,
        "create-key": cmd_create_key,
    }
    try:
        sys.exit(commands[args.command](args))
    except ConfigError as exc:
        print(f"mvm-supervisor: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
