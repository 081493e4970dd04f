"""`mvm status`: is the installation answering, and how is each of its services and what it depends on.

The gateway's own health comes through the API (grpc.health, from any host). On the host that runs the services
(`make up`: $MVM_STATE_DIR/supervisor.json exists) it also prints each service's health and its dependencies
(etcd, disk, VMM, nftables: docs/observability.md), as `mvm-supervisor status` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mvm_cli.context import Context
from mvm_cli.parsing import command_parser


def register(sub) -> None:
    status = command_parser(
        sub,
        "status",
        "the gateway's health, and on this host every service's and its dependencies'",
        "mvm status",
        description="Exit status 0 when the gateway answers SERVING, 1 otherwise. On the host that runs the "
        "services, each service's health and dependencies follow.",
    )
    status.set_defaults(handler=status_command)


def gateway_health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as error:
            return f"UNREACHABLE ({error.code().name}: {error.details()})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def status_command(ctx: Context, args) -> int:
    address = ctx.client.aio.address
    health = gateway_health(address)
    print(f"gateway {address}: {health}")
    state_dir = Path(os.environ.get("MVM_STATE_DIR") or Path.home() / ".microvm")
    if (state_dir / "supervisor.json").exists():
        local = subprocess.run(
            [sys.executable, "-m", "services.supervisor.main", "status", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        sys.stdout.write(local.stdout or local.stderr)
    return 0 if health == "SERVING" else 1
