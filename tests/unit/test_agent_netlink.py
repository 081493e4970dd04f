"""The agent's network configuration over rtnetlink (guest_agents/linux/microvm_agent/netlink.py) leaves an interface
exactly as the `ip -batch` it replaces did: MAC, addresses, routes and neighbours, each in a network namespace of
its own (`unshare --net`, a TAP standing in for the guest's NIC)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "guest_agents" / "linux"
# What a snapshot's guest carries: another address (and a secondary), a neighbour learned and one set by hand.
BEFORE = """
set -e
ip tuntap add dev eth0 mode tap
ip link set eth0 address 02:00:00:00:00:01
ip link set eth0 up
ip addr add 10.9.9.9/16 dev eth0
ip addr add 10.9.9.10/16 dev eth0
ip neigh add 10.9.0.5 lladdr 02:00:00:00:00:05 dev eth0 nud reachable
ip neigh add 10.9.0.6 lladdr 02:00:00:00:00:06 dev eth0 nud permanent
"""
SHOW = """
ip -j addr show dev eth0
ip -j route show
ip -j neigh show dev eth0
"""
IP_BATCH = """
ip -batch - <<END
link set dev eth0 down
link set dev eth0 address {mac}
addr flush dev eth0
addr add {cidr} dev eth0
link set dev eth0 up
neigh flush dev eth0
route replace default via {gateway} dev eth0
END
"""
NETLINK = f"""
PYTHONPATH={AGENT} {sys.executable} -c 'from microvm_agent import netlink; netlink.configure("eth0", "{{mac}}", \
"{{cidr}}", "{{gateway}}")'
"""


def in_namespace(script: str) -> list:
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def comparable(state: list) -> list:
    addresses, routes, neighbours = state
    for link in addresses:
        link.pop("ifindex", None)
    return [addresses, routes, sorted(neighbours, key=lambda n: n["dst"])]  # a hash table's order


@pytest.mark.parametrize(
    "change",
    [
        {"mac": "0a:58:0a:d5:00:07", "cidr": "10.213.0.7/16", "gateway": "10.213.0.1"},
        {"mac": "0a:58:0a:d5:00:08", "cidr": "10.213.0.8/24", "gateway": "10.213.0.1"},
    ],
)
def test_netlink_configures_the_nic_as_ip_did(change):
    by_ip = in_namespace(BEFORE + IP_BATCH.format(**change) + SHOW)
    by_netlink = in_namespace(BEFORE + NETLINK.format(**change) + NETLINK.format(**change) + SHOW)  # twice: idempotent
    assert comparable(by_netlink) == comparable(by_ip)
    addresses, routes, _ = by_netlink
    assert addresses[0]["address"] == change["mac"]
    assert [a["local"] for a in addresses[0]["addr_info"]] == [change["cidr"].split("/")[0]]
    assert {"dst": "default", "gateway": change["gateway"], "dev": "eth0"}.items() <= routes[0].items()


@pytest.mark.parametrize(
    "bad",
    [
        {"mac": "0a:58:0a:d5:00:07", "cidr": "10.213.0.7/40", "gateway": "10.213.0.1"},
        {"mac": "0a:58:0a:d5:00", "cidr": "10.213.0.7/16", "gateway": "10.213.0.1"},
        {"mac": "zz:58:0a:d5:00:07", "cidr": "10.213.0.7/16", "gateway": "10.213.0.1"},
        {"mac": "0a:58:0a:d5:00:07", "cidr": "10.213.0.7/16", "gateway": "10.213.0.300"},
    ],
)
def test_a_malformed_request_changes_nothing(bad):
    untouched = in_namespace(BEFORE + SHOW)
    after = in_namespace(BEFORE + "set +e\n" + NETLINK.format(**bad) + "[ $? -ne 0 ] || exit 9\nset -e\n" + SHOW)
    assert comparable(after) == comparable(untouched)
