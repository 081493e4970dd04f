"""A health probe for one service, for orchestrators that cannot speak mutual-TLS gRPC (Kubernetes exec probes).

    python -m services.common.probe --config /etc/microvm/config.yaml compute
    python -m services.common.probe --config FILE --address 10.0.0.5:50053 compute

It loads the config the way the service does (same file, same MVM_* overrides), connects to the service's
listen port on this machine (or `--address`) with the service's own certificate when `internal_tls` is on
(plain for the gateway, whose public port is plain), and asks the standard gRPC health service about
service "". Exit codes: 0 SERVING, 1 anything else (with one line on stderr saying why), 2 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ConfigError, load_config, parse_address
from services.common.pki import load_identity
from services.common.settings import SECTIONS

KINDS = tuple(kind for kind in SECTIONS if kind != "supervisor")
# The gateway's gRPC port is the public door: plain, authenticated with bearer credentials.
PLAIN_KINDS = {"gateway"}
DEADLINE_SECONDS = 2.0
# Every service certificate from services/common/pki.py names `localhost`; checking that name keeps the check
# "this is a server of our CA" whichever address the probe dials.
TLS_SERVER_NAME = "localhost"

SERVING, UNHEALTHY, BAD_CONFIG = 0, 1, 2


@dataclass(frozen=True)
class ProbeTarget:
    """Where to call, and with which credentials (None: plain)."""

    address: str
    credentials: grpc.ChannelCredentials | None


def local_address(listen: str) -> str:
    """The address to dial for a service listening on `listen`: loopback for a wildcard or loopback listen,
    else the listen address itself."""
    host, port = parse_address(listen, key="listen")
    if port == 0:
        raise ConfigError(f"listen {listen!r} picks a free port at start; give the probe --address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if host in ("", "localhost") or (ip is not None and (ip.is_unspecified or ip.is_loopback)):
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ip is not None and ip.version == 6 else f"{host}:{port}"


def resolve_target(config_path: str | None, kind: str, address: str | None = None, environ=None) -> ProbeTarget:
    """Loads the config as the service does; raises ConfigError when it (or the service's identity) is unusable."""
    if kind not in KINDS:
        raise ConfigError(f"unknown service kind {kind!r}; known: {', '.join(KINDS)}")
    config = load_config(config_path, kind, SECTIONS[kind], environ=environ)
    if address is not None:
        parse_address(address, key="--address", allow_zero=False)
    target = address or local_address(config.service.listen)
    credentials = None
    if config.common.internal_tls and kind not in PLAIN_KINDS:
        credentials = load_identity(config.common.pki_path, kind).channel_credentials()
    return ProbeTarget(target, credentials)


async def check(target: ProbeTarget, timeout: float = DEADLINE_SECONDS) -> tuple[int, str]:
    """Asks the health service about service "": (0, "SERVING") or (1, why not)."""
    if target.credentials is not None:
        channel = grpc.aio.secure_channel(
            target.address, target.credentials, options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
        )
    else:
        channel = grpc.aio.insecure_channel(target.address)
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            details = " ".join((exc.details() or "").split())
            return UNHEALTHY, f"{target.address}: {exc.code().name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return UNHEALTHY, f"{target.address}: {status}"
    return SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="installation config file (YAML); default: built-in defaults")
    parser.add_argument("--address", help="host:port to call instead of the local listen port")
    parser.add_argument("--timeout", type=float, default=DEADLINE_SECONDS, help="deadline of the call, seconds")
    parser.add_argument("kind", help=f"the service: {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    try:
        target = resolve_target(args.config, args.kind, args.address)
    except ConfigError as exc:
        print(f"probe {args.kind}: bad configuration: {exc}", file=sys.stderr)
        return BAD_CONFIG
    code, reason = asyncio.run(check(target, args.timeout))
    if code != SERVING:
        print(f"probe {args.kind}: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
