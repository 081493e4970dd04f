"""A cluster on this machine: one etcd and the control services (gateway, auth) in the root namespace, and each
node's services (compute, network, relay, snapshot) in a network namespace of its own, with its own state dir,
node id and addresses, under its own `mvm-supervisor run --role node`.

    root namespace   bridge mvmc<tag> 10.77.<n>.1/24: etcd and auth listen there, the gateway on 127.0.0.1
    node n1, n2, n3  veth 10.77.<n>.11, .12, .13/24: that node's services; its VMs are that node's processes

Nodes can be killed (SIGKILL of their supervisor and services: their leases run out, their VMs live on) and
started again. Tests reach the cluster only through the gateway on 127.0.0.1 and through these namespaces.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common.pki import ensure_pki
from tests.netns import sh
from tests.stack import REPO, free_port, start_stack

_subnets_used: set[int] = set()


def _subnet() -> int:
    for third in range(77, 120):
        if third not in _subnets_used and f"10.{third}." not in sh("ip", "-4", "addr"):
            _subnets_used.add(third)
            return third
    raise RuntimeError("no free 10.x.0.0/24 for a test cluster")


@dataclass
class ClusterNode:
    name: str
    namespace: str | None  # None: in the root namespace, beside the gateway
    address: str
    state_dir: Path
    config_path: Path
    process: subprocess.Popen | None = None

    def log(self, kind: str) -> str:
        path = self.state_dir / "logs" / f"{kind}.log"
        return path.read_text() if path.exists() else ""


@dataclass
class Cluster:
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: dict[str, ClusterNode] = field(default_factory=dict)
    control = None

    owns_root: bool = False

    @classmethod
    def in_short_temporary_dir(cls) -> Cluster:
        """A cluster rooted in /tmp/mvmc-XXXX: pytest's tmp paths plus a VM's socket path pass the 107 bytes a unix
        socket path may have (compute refuses such a state dir), so the root stays short; stop() removes it."""
        return cls(Path(tempfile.mkdtemp(prefix="mvmc-")), owns_root=True)

    @property
    def bridge(self) -> str:
        return f"mvmc{self.tag}"

    def start(
        self,
        node_names=("n1", "n2", "n3"),
        compute: dict | None = None,
        lease_ttl_seconds: int = 2,
        node_labels: dict[str, list[str]] | None = None,
        local_nodes=(),
    ) -> Cluster:
        """`node_names` each in a namespace of their own; `local_nodes` in the root namespace (as the gateway)."""
        self.third = _subnet()
        self.gateway_ip = f"10.{self.third}.0.1"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        etcd_port = free_port()
        self.control = start_stack(
            self.root / "control",
            {
                "lease_ttl_seconds": lease_ttl_seconds,
                "supervisor": {
                    "etcd_client_port": etcd_port,
                    "etcd_listen_host": self.gateway_ip,
                    "prometheus_listen": "",
                },
                "auth": {"listen": f"{self.gateway_ip}:0"},
            },
            role="control",
        )
        self.etcd_endpoint = f"{self.gateway_ip}:{etcd_port}"
        ensure_pki(self.control.state_dir / "pki")
        for index, name in enumerate(node_names):
            self._make_node(name, index, compute or {}, lease_ttl_seconds, (node_labels or {}).get(name, []))
        for name in local_nodes:
            self._make_node(name, None, compute or {}, lease_ttl_seconds, (node_labels or {}).get(name, []))
        for name in [*node_names, *local_nodes]:
            self.start_node(name)
        for name in [*node_names, *local_nodes]:
            self.wait_for_node(name)
        return self

    def _make_node(self, name: str, index: int | None, compute: dict, ttl: int, labels: list[str]) -> None:
        namespace, address = None, self.gateway_ip
        if index is not None:
            namespace, address = f"mvmc-{self.tag}-{name}", f"10.{self.third}.0.{11 + index}"
            host_end, node_end = f"mvh{self.tag}{index}", f"mvn{self.tag}{index}"
            sh("ip", "netns", "add", namespace)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", namespace)
            sh("ip", "link", "set", host_end, "master", self.bridge)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "link", "set", "lo", "up", namespace=namespace)
            sh("ip", "addr", "add", f"{address}/24", "dev", node_end, namespace=namespace)
            sh("ip", "link", "set", node_end, "up", namespace=namespace)
        state_dir = self.root / name
        state_dir.mkdir(parents=True)
        listen = {"listen": f"{address}:0"}
        config = {
            "state_dir": str(state_dir),
            "etcd_endpoints": [self.etcd_endpoint],
            "lease_ttl_seconds": ttl,
            "node_id": name,
            "node_labels": labels,
            "networking": False,
            "pki_dir": str(self.control.state_dir / "pki"),
            "compute": {**listen, "shutdown_grace_seconds": 1, **compute},
            "relay": {**listen, "shutdown_grace_seconds": 1},
            "network": {**listen, "shutdown_grace_seconds": 1},
            "snapshot": {**listen, "shutdown_grace_seconds": 1, "gc_interval_seconds": 3600},
        }
        config_path = state_dir / "node.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.nodes[name] = ClusterNode(name, namespace, address, state_dir, config_path)

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVM_")}
        log = open(node.state_dir / "supervisor.log", "ab")
        # A session of its own: a kill takes the supervisor and its services, not the VMs (their own sessions).
        prefix = ["ip", "netns", "exec", node.namespace] if node.namespace else []
        node.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "services.supervisor.main",
                "run",
                "--role",
                "node",
                "--state-dir",
                str(node.state_dir),
                "--config",
                str(node.config_path),
            ],
            stdout=log,
            stderr=log,
            env=dict(env, MVM_STATE_DIR=str(node.state_dir)),
            cwd=REPO,
            start_new_session=True,
        )

    def wait_for_node(self, name: str, timeout: float = 60) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {name} exited: {(node.state_dir / 'supervisor.log').read_text()[-3000:]}")
            mine = {i.kind for i in self.control.registered() if i.node == name}
            if {"compute", "relay", "snapshot", "network"} <= mine:
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {name} did not register in {timeout}s: {node.log('compute')[-2000:]}")

    def kill_node(self, name: str) -> None:
        """The node's supervisor and services die at once, as in a power cut of the services (not of the VMs)."""
        node = self.nodes[name]
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(10)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.process is not None:
                try:
                    node.process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.process.pid, signal.SIGKILL)
            if node.namespace:
                for pid in sh("ip", "netns", "pids", node.namespace, check=False).split():
                    subprocess.run(["kill", "-9", pid], capture_output=True)
        if self.control is not None:
            self.control.stop()
        for node in self.nodes.values():
            if node.namespace:
                sh("ip", "netns", "del", node.namespace, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
