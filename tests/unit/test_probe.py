"""The exec health probe against real grpc.aio servers on 127.0.0.1, with and without mutual TLS."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import probe
from services.common.config import ConfigError
from services.common.pki import ensure_pki, load_identity

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    ensure_pki(directory)
    return directory


async def health_server(status, credentials: grpc.ServerCredentials | None = None):
    """A grpc.aio server on a free loopback port with only the health service, reporting `status` for ""."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await servicer.set("", status)
    return server, port


def write_config(tmp_path: Path, kind: str, port: int, pki_dir: Path, internal_tls: bool = True) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"pki_dir: {pki_dir}\ninternal_tls: {str(internal_tls).lower()}\n{kind}:\n  listen: 0.0.0.0:{port}\n"
    )
    return path


async def run_probe(*args: str) -> tuple[int, str]:
    """The probe as Kubernetes runs it: its own process, only the environment it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVM_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.common.probe", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, stderr.decode()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_probe_exits_0_when_an_internal_service_serves_over_mutual_tls(tmp_path, pki_dir):
    server, port = await health_server(
        health_pb2.HealthCheckResponse.SERVING, load_identity(pki_dir, "compute").server_credentials()
    )
    try:
        code, stderr = await run_probe("--config", str(write_config(tmp_path, "compute", port, pki_dir)), "compute")
    finally:
        await server.stop(None)
    assert (code, stderr) == (0, "")


async def test_probe_exits_1_with_the_status_when_the_service_is_not_serving(tmp_path, pki_dir):
    server, port = await health_server(
        health_pb2.HealthCheckResponse.NOT_SERVING, load_identity(pki_dir, "relay").server_credentials()
    )
    try:
        code, stderr = await run_probe("--config", str(write_config(tmp_path, "relay", port, pki_dir)), "relay")
    finally:
        await server.stop(None)
    assert code == 1
    assert stderr.strip() == f"probe relay: 127.0.0.1:{port}: NOT_SERVING"


async def test_probe_exits_1_on_one_line_when_nothing_listens(tmp_path, pki_dir):
    port = closed_port()
    code, stderr = await run_probe("--config", str(write_config(tmp_path, "snapshot", port, pki_dir)), "snapshot")
    assert code == 1
    assert stderr.startswith(f"probe snapshot: 127.0.0.1:{port}: UNAVAILABLE")
    assert stderr.count("\n") == 1


async def test_probe_calls_the_gateway_plain_even_with_internal_tls_on(tmp_path, pki_dir):
    server, port = await health_server(health_pb2.HealthCheckResponse.SERVING)
    try:
        target = probe.resolve_target(str(write_config(tmp_path, "gateway", port, pki_dir)), "gateway", environ={})
        assert target.credentials is None
        assert await probe.check(target) == (0, "SERVING")
    finally:
        await server.stop(None)


async def test_address_overrides_the_listen_port(tmp_path, pki_dir):
    server, port = await health_server(health_pb2.HealthCheckResponse.SERVING)
    try:
        config = write_config(tmp_path, "auth", closed_port(), pki_dir, internal_tls=False)
        target = probe.resolve_target(str(config), "auth", address=f"127.0.0.1:{port}", environ={})
        assert await probe.check(target) == (0, "SERVING")
    finally:
        await server.stop(None)


async def test_a_server_of_another_ca_fails_the_probe(tmp_path, pki_dir):
    other = tmp_path / "other-pki"
    ensure_pki(other)
    server, port = await health_server(
        health_pb2.HealthCheckResponse.SERVING, load_identity(other, "network").server_credentials()
    )
    try:
        target = probe.resolve_target(str(write_config(tmp_path, "network", port, pki_dir)), "network", environ={})
        code, reason = await probe.check(target)
    finally:
        await server.stop(None)
    assert code == 1
    assert "UNAVAILABLE" in reason


async def test_a_server_that_never_answers_fails_within_the_deadline(tmp_path, pki_dir):
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        config = write_config(tmp_path, "auth", port, pki_dir, internal_tls=False)
        started = time.monotonic()
        code, reason = await probe.check(probe.resolve_target(str(config), "auth", environ={}), timeout=0.5)
    finally:
        silent.close()
    assert code == 1, reason
    assert time.monotonic() - started < 2.0


def test_bad_config_exits_2_naming_the_key(tmp_path, pki_dir, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("MVM_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "config.yaml"
    path.write_text("compute: {listen: nowhere}\n")
    assert probe.main(["--config", str(path), "compute"]) == 2
    assert capsys.readouterr().err == "probe compute: bad configuration: compute.listen: 'nowhere' is not host:port\n"


def test_a_missing_certificate_is_bad_config(tmp_path, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("MVM_")]:
        monkeypatch.delenv(name)
    config = write_config(tmp_path, "compute", 50053, tmp_path / "no-pki")
    assert probe.main(["--config", str(config), "compute"]) == 2
    assert "no service certificate for compute" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "dialled"),
    [
        ("0.0.0.0:50053", "127.0.0.1:50053"),
        ("[::]:50054", "127.0.0.1:50054"),
        ("127.0.0.1:50055", "127.0.0.1:50055"),
        ("10.1.2.3:50056", "10.1.2.3:50056"),
    ],
)
def test_the_probe_dials_loopback_for_a_wildcard_listen(listen, dialled):
    assert probe.local_address(listen) == dialled


def test_a_free_port_listen_needs_an_address():
    with pytest.raises(ConfigError, match="--address"):
        probe.local_address("127.0.0.1:0")
