"""The network service's metrics (services/network/metrics.py): guest addresses in use and free in the node's pool,
and TAP devices on the host, as sandboxes come and go. A one-node installation with networking on runs in a network
namespace of its own, so nothing of this host's network is touched (tests/network_metrics_checks.py)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from tests.netns import run_in, sh
from tests.network_metrics_checks import SUBNET, observe

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")),
        reason="needs root, iproute2 and nftables (a network namespace of its own)",
    ),
]
HOSTS = 14 - 1  # a /28 has 14 host addresses; the bridge holds the first


@pytest.fixture(scope="module")
def seen():
    namespace = f"mvmut-netm-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", namespace)
    try:
        sh("ip", "link", "set", "lo", "up", namespace=namespace)
        yield run_in(namespace, observe, timeout=200)
    finally:
        for pid in sh("ip", "netns", "pids", namespace, check=False).split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        sh("ip", "netns", "del", namespace, check=False)


def test_addresses_in_use_and_free_follow_the_sandboxes_of_the_node(seen):
    assert seen["before"]["addresses"] == {"used": (SUBNET, 0), "free": (SUBNET, HOSTS)}
    assert seen["two_sandboxes"]["addresses"] == {"used": (SUBNET, 2), "free": (SUBNET, HOSTS - 2)}
    assert seen["one_deleted"]["addresses"] == {"used": (SUBNET, 1), "free": (SUBNET, HOSTS - 1)}


def test_tap_devices_on_the_host_follow_the_sandboxes(seen):
    assert (seen["before"]["taps"], seen["two_sandboxes"]["taps"], seen["one_deleted"]["taps"]) == (0, 2, 1)
