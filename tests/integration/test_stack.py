"""The local stack as `make up` runs it: real etcd, real service processes, the real supervisor."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from microvm.network.v1 import network_pb2, network_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from services.common.errors import error_info
from services.common.registry import ServiceInstance
from services.supervisor.stack import SERVICE_KINDS, stop_leftover_vms
from tests.stack import REPO, start_stack

GRPCURL = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "grpcurl")


def registered(stack) -> list[ServiceInstance]:
    return stack.registered()


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_every_service_reports_serving(stack):
    assert stack.health() == {kind: "SERVING" for kind in SERVICE_KINDS}


def test_every_service_is_registered_in_etcd_with_a_reachable_address(stack):
    # A restarted instance's predecessor may linger for one lease TTL (2 s here): wait it out.
    deadline = time.monotonic() + 5
    while len(instances := registered(stack)) != len(SERVICE_KINDS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(i.kind for i in instances) == sorted(SERVICE_KINDS)
    gateway = next(i for i in instances if i.kind == "gateway")
    assert gateway.address == stack.gateway_address


def test_grpcurl_lists_the_public_api_through_reflection(stack):
    listed = subprocess.run(
        [GRPCURL, "-plaintext", stack.gateway_address, "list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert "microvm.sandbox.v1.SandboxService" in listed
    assert "grpc.health.v1.Health" in listed


def test_grpcurl_describes_the_public_service_and_its_messages(stack):
    def describe(symbol):
        return subprocess.run(
            [GRPCURL, "-plaintext", stack.gateway_address, "describe", symbol],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    service = describe("microvm.sandbox.v1.SandboxService")
    assert "rpc Exec ( .microvm.sandbox.v1.ExecRequest ) returns ( stream .microvm.sandbox.v1.ExecResponse )" in service
    assert "oneof event" in describe("microvm.sandbox.v1.ExecResponse")


def test_networking_turned_off_is_a_failed_precondition_naming_the_switch(stack, gateway):
    # The shared test stack runs with `networking: false` (tests/integration/test_network.py turns it on
    # inside network namespaces).
    network = next(i for i in registered(stack) if i.kind == "network")
    with pytest.raises(grpc.RpcError) as failure:
        network_pb2_grpc.NetworkServiceStub(stack.internal_channel(network.address)).ExposePort(
            network_pb2.ExposePortRequest(sandbox_id="x", guest_port=80), timeout=5
        )
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(failure.value).reason == "NETWORKING_DISABLED"
    with pytest.raises(grpc.RpcError) as failure:
        gateway.create(network_policy=sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_FULL))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "networking: false" in failure.value.details()


def test_killed_service_leaves_the_registry_within_ttl_and_is_restarted(stack):
    before = next(i for i in registered(stack) if i.kind == "network")
    killed_at = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)

    restarted_after = gone_after = None
    while time.monotonic() - killed_at < 10 and (restarted_after is None or gone_after is None):
        instances = [i for i in registered(stack) if i.kind == "network"]
        if gone_after is None and before.key not in {i.key for i in instances}:
            gone_after = time.monotonic() - killed_at
        if restarted_after is None and any(i.pid != before.pid for i in instances):
            restarted_after = time.monotonic() - killed_at
        time.sleep(0.05)
    assert gone_after is not None and gone_after <= 2 + 1.0, "stale key outlived the 2 s lease TTL"
    assert restarted_after is not None and restarted_after <= 2.0, f"restart took {restarted_after}"
    deadline = time.monotonic() + 10
    while stack.health().get("network") != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.health().get("network") == "SERVING"


def test_the_stacks_prometheus_scrapes_every_service_it_finds_in_the_registry(stack):
    if not shutil.which("prometheus"):
        pytest.skip("Debian's prometheus is not installed (make apt installs it)")
    url = f"http://{stack.prometheus_address}/api/v1/query?query=up"
    deadline, jobs = time.monotonic() + 90, set()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                results = json.load(response)["data"]["result"]
            jobs = {r["metric"]["job"] for r in results if r["value"][1] == "1"}
            if jobs >= set(SERVICE_KINDS):
                break
        except OSError:
            pass
        time.sleep(0.5)
    assert jobs >= set(SERVICE_KINDS), jobs


def test_supervisor_sigterm_leaves_no_process_behind(tmp_path):
    own = start_stack(tmp_path / "own")
    children = json.loads((own.state_dir / "supervisor.json").read_text())
    pids = [entry["pid"] for entry in children.values()]
    with_prometheus = {"prometheus"} if shutil.which("prometheus") else set()
    assert set(children) == {"etcd", *SERVICE_KINDS} | with_prometheus and all(pid_alive(p) for p in pids)
    assert own.stop(timeout=40) == 0
    time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == []
    vmm_pids = [int(p.read_text()) for p in (own.state_dir / "compute" / "vms").glob("*/vmm.pid")]
    assert [p for p in vmm_pids if pid_alive(p)] == []


def test_children_die_with_a_killed_supervisor(tmp_path):
    own = start_stack(tmp_path / "own")
    pids = [entry["pid"] for entry in json.loads((own.state_dir / "supervisor.json").read_text()).values()]
    own.process.kill()
    own.process.wait()
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if pid_alive(p)] == []
    # VMs outlive their supervisor by design (a restarted one re-adopts them); this test's must go.
    stop_leftover_vms(own.state_dir)


@pytest.mark.parametrize("kind", ["compute", "relay", "network", "snapshot", "auth"])
def test_internal_service_refuses_callers_without_a_service_certificate(stack, tmp_path, kind):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.pki import ensure_pki, load_identity

    address = next(i for i in registered(stack) if i.kind == kind).address
    request = health_pb2.HealthCheckRequest()
    # No TLS at all.
    with pytest.raises(grpc.RpcError) as failure:
        health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check(request, timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # TLS with a certificate from another CA (another installation).
    ensure_pki(tmp_path / "other")
    stranger = load_identity(tmp_path / "other", "operator")
    own_ca = (stack.state_dir / "pki" / "ca.crt").read_bytes()
    credentials = grpc.ssl_channel_credentials(own_ca, stranger.key, stranger.certificate)
    with pytest.raises(grpc.RpcError) as failure:
        health_pb2_grpc.HealthStub(grpc.secure_channel(address, credentials)).Check(request, timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # This installation's certificate is let in.
    reply = health_pb2_grpc.HealthStub(stack.internal_channel(address)).Check(request, timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_etcd_admits_only_this_installations_certificates(stack, tmp_path):
    """Whoever reaches etcd's port without a certificate of the installation reads and writes nothing (before:
    anyone could write an admin API key record, or read the signing keys)."""
    import asyncio

    import aetcd

    from services.common.pki import ensure_pki, load_identity
    from services.common.registry import etcd_client

    async def reads(identity) -> bool:
        client = etcd_client([stack.etcd_endpoint], timeout=3, identity=identity)
        try:
            await client.connect()
            await client.get(b"/microvm/auth/signing-keys/")
            return True
        except aetcd.exceptions.ConnectionFailedError:
            return False
        finally:
            await client.close()

    ensure_pki(tmp_path / "other")
    assert not asyncio.run(reads(None))
    assert not asyncio.run(reads(load_identity(tmp_path / "other", "operator")))
    assert asyncio.run(reads(stack.etcd_identity))


def test_network_service_without_host_tools_exits_with_what_is_missing(stack, tmp_path):
    # iproute2 and nftables out of reach (as on a host without them): a clear refusal, nothing half set up.
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "networking": True,
                "etcd_endpoints": [stack.etcd_endpoint],
                "state_dir": str(tmp_path),
                "pki_dir": str(stack.state_dir / "pki"),
                "network": {"bridge": "mvmnotools0"},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "services.network", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        # A node of its own: the stack's network service holds its node's lock.
        env={**os.environ, "PATH": str(tmp_path), "MVM_NODE_ID": "no-tools"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "networking: true needs iproute2, nftables and CAP_NET_ADMIN" in result.stderr
    assert "networking: false" in result.stderr
