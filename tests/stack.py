"""A real local stack for tests: the supervisor in the foreground, etcd and all services on free
loopback ports, state in a temporary directory."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from services.common.config import ConfigError
from services.common.pki import TLS_CHANNEL_OPTIONS, Identity, load_identity
from services.common.registry import SERVICES_PREFIX, ServiceInstance, etcd_client
from services.supervisor.stack import ROLES, SERVICE_KINDS, check_stack_health
from tests.etcd import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LocalStack:
    state_dir: Path
    config_path: Path
    etcd_endpoint: str
    gateway_address: str
    process: subprocess.Popen
    kinds: tuple[str, ...] = SERVICE_KINDS
    admin_key: str = ""

    @property
    def prometheus_address(self) -> str:
        """The stack's own Prometheus (empty: none), as its config says."""
        import yaml

        return yaml.safe_load(self.config_path.read_text()).get("supervisor", {}).get("prometheus_listen", "")

    @property
    def admin_key_path(self) -> Path:
        return self.state_dir / "admin.key"

    def health(self, detailed: bool = False) -> dict[str, str]:
        try:
            identity = self.etcd_identity
        except ConfigError:
            return {"etcd": "NO PKI YET"}  # the supervisor makes it as it starts
        return asyncio.run(
            check_stack_health([self.etcd_endpoint], detailed=detailed, pki_dir=self.pki_dir, etcd_identity=identity)
        )

    @property
    def etcd_identity(self) -> Identity | None:
        """The operator's certificate, which the stack's etcd requires (unless the test turned etcd_tls off)."""
        if yaml.safe_load(self.config_path.read_text()).get("etcd_tls", True) is False:
            return None
        return load_identity(self.pki_dir, "operator")

    def etcd_client(self, timeout: float = 5.0):
        """A client of the stack's etcd (connect it in the event loop that uses it)."""
        return etcd_client([self.etcd_endpoint], timeout=timeout, identity=self.etcd_identity)

    @property
    def pki_dir(self) -> Path:
        configured = yaml.safe_load(self.config_path.read_text()).get("pki_dir")
        return Path(configured) if configured else self.state_dir / "pki"

    def registered(self) -> list[ServiceInstance]:
        """Every service instance registered in etcd right now."""

        async def read():
            client = self.etcd_client()
            await client.connect()
            try:
                return [
                    ServiceInstance.decode(kv.key, kv.value) for kv in await client.get_prefix(SERVICES_PREFIX.encode())
                ]
            finally:
                await client.close()

        return asyncio.run(read())

    def internal_channel(self, address: str) -> grpc.Channel:
        """A channel to an internal service, presenting the operator's certificate (mutual TLS)."""
        identity = load_identity(self.pki_dir, "operator")
        return grpc.secure_channel(address, identity.channel_credentials(), options=TLS_CHANNEL_OPTIONS)

    def log(self, name: str) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:  # a copy handed into a network namespace; its owner stops it
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_stack(
    state_dir: Path,
    extra_config: dict | None = None,
    timeout: float = 60,
    netns: str | None = None,
    role: str = "all",
    etcd_endpoint: str | None = None,
) -> LocalStack:
    """The supervisor with a fresh config; inside network namespace `netns` when given (tests/netns.py). With
    `etcd_endpoint`, it joins that etcd (another stack's) instead of running its own."""
    state_dir.mkdir(parents=True, exist_ok=True)
    etcd_port = free_port()
    gateway_port = free_port()
    config = {
        "lease_ttl_seconds": 2,
        # Sandbox networking changes the host's network; it is tested in namespaces (tests/netns.py).
        "networking": False,
        "gateway": {
            "listen": f"127.0.0.1:{gateway_port}",
            "http_listen": f"127.0.0.1:{free_port()}",
            # the E2B doors on free ports too: 3000 and 3001 may be another stack's (or a Grafana's)
            "e2b_api_listen": f"127.0.0.1:{free_port()}",
            "e2b_sandbox_listen": f"127.0.0.1:{free_port()}",
        },
        # its own Prometheus too, on a free port (not the installation's 9090)
        "supervisor": {
            "etcd_client_port": etcd_port,
            "etcd_peer_port": free_port(),
            "prometheus_listen": f"127.0.0.1:{free_port()}",
        },
        # Retention runs only when a test asks (CollectGarbage), so tests see exactly what they caused.
        "snapshot": {"keep_last_per_sandbox": 3, "gc_interval_seconds": 3600},
    }
    if etcd_endpoint:
        config["etcd_endpoints"] = [etcd_endpoint]
    for section, values in (extra_config or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    config_path = state_dir / "test-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, MVM_STATE_DIR=str(state_dir))
    env.pop("MVM_ETCD_ENDPOINTS", None)
    log = open(state_dir / "supervisor-test.log", "ab")
    prefix = ["ip", "netns", "exec", netns] if netns else []
    process = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "services.supervisor.main",
            "run",
            "--state-dir",
            str(state_dir),
            "--config",
            str(config_path),
            "--role",
            role,
            *(["--no-etcd"] if etcd_endpoint else ["--etcd"] if role != "all" else []),
        ],
        stdout=log,
        stderr=log,
        env=env,
        cwd=REPO,
    )
    # Reached over loopback even when extra_config binds them to every address.
    gateway_address = f"127.0.0.1:{config['gateway']['listen'].rpartition(':')[2]}"
    etcd_endpoint = etcd_endpoint or f"127.0.0.1:{config['supervisor']['etcd_client_port']}"
    stack = LocalStack(state_dir, config_path, etcd_endpoint, gateway_address, process, kinds=ROLES[role])
    if netns:
        from tests.netns import run_in

        try:
            run_in(netns, wait_until_serving, dataclasses.replace(stack, process=None), timeout)
        except BaseException:
            stack.stop()
            raise
        stack.admin_key = stack.admin_key_path.read_text().strip()
        return stack
    return wait_until_serving(stack, timeout)


def wait_until_serving(stack: LocalStack, timeout: float) -> LocalStack:
    """The stack once every service of its role serves; on any failure the stack is stopped, never leaked."""
    try:
        return _wait_until_serving(stack, timeout)
    except BaseException:
        if stack.process is not None:
            stack.stop()
        raise


def _wait_until_serving(stack: LocalStack, timeout: float) -> LocalStack:
    process, state_dir = stack.process, stack.state_dir
    deadline = time.monotonic() + timeout
    report: dict[str, str] = {}
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"supervisor exited {process.returncode}: {(state_dir / 'supervisor-test.log').read_text()[-2000:]}"
            )
        report = stack.health()
        serving = all(report.get(kind) == "SERVING" for kind in stack.kinds) and stack.admin_key_path.exists()
        # Its own gateway, not another stack's on the same etcd.
        if serving and (
            "gateway" not in stack.kinds
            or any(i.kind == "gateway" and i.address == stack.gateway_address for i in stack.registered())
        ):
            stack.admin_key = stack.admin_key_path.read_text().strip()
            return stack
        time.sleep(0.2)
    raise RuntimeError(f"stack not SERVING after {timeout}s: {report}")
