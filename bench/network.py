"""`make bench`, network part: what sandbox networking costs, each figure beside a baseline from the same run.

Runs a stack inside network namespaces it creates (tests/netns.py); no packet leaves them.

- exposed_port_download: 32 MiB over HTTP from a guest through its exposed port (the host's TCP relay), vs
  the same download from the node straight to the guest's address and port (no relay).
- exposed_port_first_byte_p50: connect + request + first byte through the relay, vs straight to the guest.
- policy_change_p50: UpdateSandbox(network_policy), which rewrites the node's rules, vs GetSandbox (the same
  gateway round trip without the network service).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.run import emit
from microvm.sandbox.v1 import sandbox_pb2
from tests import netns_checks as checks
from tests.netns import NetnsLab, run_in
from tests.stack import free_port, start_stack

DOWNLOAD_BYTES = 32 << 20
GUEST_PORT = 8080


def download_seconds(url: str, rounds: int = 3) -> float:
    """Best of `rounds` full downloads (runs in the node namespace)."""
    import urllib.request

    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as response:
            while response.read(1 << 20):
                pass
        best = min(best, time.perf_counter() - t0)
    return best


def first_byte_seconds(host: str, port: int, rounds: int = 50) -> list[float]:
    import socket

    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"HEAD /blob HTTP/1.0\r\n\r\n")
            s.recv(1)
        samples.append(time.perf_counter() - t0)
    return samples


def policy_change_seconds(address: str, key: str, name: str, rounds: int = 20) -> tuple[list[float], list[float]]:
    updates, gets = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        checks.update_policy(
            address, key, name, sandbox_pb2.EGRESS_MODE_FULL if i % 2 else sandbox_pb2.EGRESS_MODE_NONE
        )
        updates.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checks.get(address, key, name)
        gets.append(time.perf_counter() - t0)
    return updates, gets


def main() -> None:
    lab = NetnsLab.create()
    stack = None
    try:
        with tempfile.TemporaryDirectory(prefix="mvm-bench-net-") as tmp:
            stack = start_stack(
                Path(tmp) / "stack",
                {
                    "networking": True,
                    "gateway": {"listen": f"127.0.0.1:{free_port()}"},
                    "compute": {"warm_pool_size": 1},
                },
                timeout=120,
                netns=lab.node,
            )
            address, key = stack.gateway_address, stack.admin_key
            sandbox = run_in(lab.node, checks.create, address, key, sandbox_pb2.EGRESS_MODE_NONE)
            code, _, err = run_in(
                lab.node,
                checks.run,
                address,
                key,
                sandbox.name,
                [
                    "sh",
                    "-c",
                    f"head -c {DOWNLOAD_BYTES} /dev/zero > /srv/blob && cd /srv && "
                    f"(nohup python3 -m http.server {GUEST_PORT} >/dev/null 2>&1 &) && sleep 1",
                ],
            )
            assert code == 0, err
            port = run_in(lab.node, checks.expose, address, key, sandbox.name, GUEST_PORT)
            relay_url = f"http://127.0.0.1:{port.host_port}/blob"
            direct_url = f"http://{sandbox.ip_address}:{GUEST_PORT}/blob"
            run_in(lab.node, download_seconds, direct_url, 1)  # the guest reads the file into its page cache
            # Interleaved rounds, best of each: both sides see the same background noise.
            relay = direct = float("inf")
            for _ in range(3):
                relay = min(relay, run_in(lab.node, download_seconds, relay_url, 2))
                direct = min(direct, run_in(lab.node, download_seconds, direct_url, 2))
            mib = DOWNLOAD_BYTES / (1 << 20)
            emit(
                "exposed_port_download",
                mib / relay,
                "MiB/s",
                mib / direct,
                "same download straight to the guest address",
                "ratio >= 0.8",
            )
            relay_samples = run_in(lab.node, first_byte_seconds, "127.0.0.1", port.host_port)
            direct_samples = run_in(lab.node, first_byte_seconds, sandbox.ip_address, GUEST_PORT)
            emit(
                "exposed_port_first_byte_p50",
                statistics.median(relay_samples) * 1000,
                "ms",
                statistics.median(direct_samples) * 1000,
                "straight to the guest address",
            )
            updates, gets = run_in(lab.node, policy_change_seconds, address, key, sandbox.name)
            emit(
                "policy_change_p50",
                statistics.median(updates) * 1000,
                "ms",
                statistics.median(gets) * 1000,
                "GetSandbox through the same gateway",
            )
    finally:
        if stack is not None:
            stack.stop()
        lab.destroy()


if __name__ == "__main__":
    main()
