"""Sandbox networking, end to end, inside network namespaces made by these tests (tests/netns.py).

The whole stack runs in a "node" namespace with its bridge, TAPs and nftables rules; an "internet"
namespace beside it serves HTTP on 198.51.100.2:8000, 198.51.100.2:8001 and 198.51.100.3:8000. Probes are
TCP connections made from inside guests (or from the node) with short timeouts: `open ...` or `blocked ...`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import time

import grpc
import pytest
import yaml

from microvm.sandbox.v1 import sandbox_pb2
from services.gateway.records import sandbox_key
from tests import netns_checks as checks
from tests.netns import (
    HTTP_ENDPOINTS,
    INTERNET,
    INTERNET_OTHER,
    METADATA,
    NODE_UPLINK,
    NetnsLab,
    RemoteRpcError,
    run_in,
    sh,
)
from tests.stack import free_port, start_stack

NONE, FULL, ALLOW_LIST = sandbox_pb2.EGRESS_MODE_NONE, sandbox_pb2.EGRESS_MODE_FULL, sandbox_pb2.EGRESS_MODE_ALLOW_LIST
SUBNET = ipaddress.ip_network("10.213.0.0/20")
BRIDGE_ADDRESS = "10.213.0.1"
INTERNET_TARGETS = [f"{host}:{port}" for host, port in HTTP_ENDPOINTS]
GUEST_SERVER_PORT = 8080

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CAP_NET_ADMIN)")


class NodeStack:
    """The stack inside the lab's node namespace, with the calls tests make against it."""

    def __init__(self, lab: NetnsLab, stack) -> None:
        self.lab, self.stack = lab, stack
        config = yaml.safe_load(stack.config_path.read_text())
        self.etcd_port = config["supervisor"]["etcd_client_port"]
        self.gateway_port = int(config["gateway"]["listen"].rpartition(":")[2])
        self.http_port = int(config["gateway"]["http_listen"].rpartition(":")[2])

    def __call__(self, function, *args):
        """A call of tests/netns_checks.py inside the node, with the gateway address and admin key."""
        return run_in(self.lab.node, function, self.stack.gateway_address, self.stack.admin_key, *args)

    def on_node(self, function, *args):
        return run_in(self.lab.node, function, *args)

    @property
    def portable_stack(self):
        """The stack's description without its process handle (which cannot cross into the namespace)."""
        return dataclasses.replace(self.stack, process=None)

    @property
    def service_targets(self) -> list[str]:
        """Our services as a sandbox could try them: on the bridge address and on the node's uplink."""
        return [
            f"{host}:{port}"
            for host in (BRIDGE_ADDRESS, NODE_UPLINK)
            for port in (self.etcd_port, self.gateway_port, self.http_port)
        ]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    lab = NetnsLab.create()
    stack = None
    try:
        stack = start_stack(
            tmp_path_factory.mktemp("netns-stack"),
            {
                "networking": True,
                "network": {"dns_servers": ["198.51.100.53"], "reconcile_interval_seconds": 1},
                # Bound to every address of the node, so only the firewall keeps sandboxes away from them.
                "gateway": {"listen": f"0.0.0.0:{free_port()}", "http_listen": f"0.0.0.0:{free_port()}"},
                "supervisor": {"etcd_listen_host": "0.0.0.0"},
                "compute": {"warm_pool_size": 1},
            },
            timeout=120,
            netns=lab.node,
        )
        yield NodeStack(lab, stack)
        stack.stop()
        # Stopping the stack kills the VMs, and their TAPs go with them (`make down` leaves none behind).
        leftover = [line for line in sh("ip", "-br", "link", namespace=lab.node).splitlines() if line.startswith("mvt")]
        assert leftover == [], leftover
    finally:
        if stack is not None:
            stack.stop()
        lab.destroy()


@pytest.fixture(scope="module")
def sandboxes(node):
    """Three guests, one per egress mode; the NONE one serves HTTP on GUEST_SERVER_PORT."""
    made = {
        "full": node(checks.create, FULL),
        "none": node(checks.create, NONE),
        "allow": node(checks.create, ALLOW_LIST, [(f"{INTERNET}/32", [8000])]),
    }
    node(checks.serve_in_guest, made["none"].name, GUEST_SERVER_PORT)
    yield made
    for sandbox in made.values():
        try:
            node(checks.delete, sandbox.name)
        except Exception:
            pass


def test_guest_gets_its_address_gateway_and_name_servers(node, sandboxes):
    addresses = [ipaddress.ip_address(s.ip_address) for s in sandboxes.values()]
    assert all(a in SUBNET for a in addresses) and len(set(addresses)) == 3
    sandbox = sandboxes["full"]
    code, out, _ = node(
        checks.run, sandbox.name, ["sh", "-c", "ip -4 -o addr show; ip route show default; cat /etc/resolv.conf"]
    )
    assert code == 0
    assert f"inet {sandbox.ip_address}/{SUBNET.prefixlen}" in out
    assert f"default via {BRIDGE_ADDRESS}" in out
    assert "nameserver 198.51.100.53" in out


def test_egress_none_blocks_the_internet(node, sandboxes):
    results = node(checks.probe_from_guest, sandboxes["none"].name, INTERNET_TARGETS)
    assert all(r.startswith("blocked") for r in results.values()), results


def test_egress_full_reaches_the_internet(node, sandboxes):
    results = node(checks.probe_from_guest, sandboxes["full"].name, INTERNET_TARGETS)
    for target, result in results.items():
        assert result == f"open internet {target}", results


def test_cloud_metadata_is_unreachable_even_with_full_egress(node, sandboxes):
    target = f"{METADATA}:80"
    assert node.on_node(checks.probe_from_host, [target])[target] == f"open internet {target}"  # it is there
    assert node(checks.probe_from_guest, sandboxes["full"].name, [target])[target].startswith("blocked")


def test_allow_list_admits_exactly_the_allowed_address_and_port(node, sandboxes):
    results = node(checks.probe_from_guest, sandboxes["allow"].name, INTERNET_TARGETS)
    assert results[f"{INTERNET}:8000"] == f"open internet {INTERNET}:8000"
    assert results[f"{INTERNET}:8001"].startswith("blocked"), results
    assert results[f"{INTERNET_OTHER}:8000"].startswith("blocked"), results


def test_sandboxes_cannot_reach_each_other_the_host_or_our_services(node, sandboxes):
    server = f"{sandboxes['none'].ip_address}:{GUEST_SERVER_PORT}"  # serve_in_guest saw it answer inside
    # Control: the services do listen on those addresses (seen from the node itself).
    from_node = node.on_node(checks.tcp_open_all, node.service_targets)
    assert all(from_node.values()), from_node
    for name in ("full", "allow"):
        results = node(checks.probe_from_guest, sandboxes[name].name, [server, *node.service_targets])
        assert all(r.startswith("blocked") for r in results.values()), (name, results)


def test_policy_change_applies_to_a_running_sandbox(node, sandboxes):
    name = sandboxes["allow"].name
    target = f"{INTERNET_OTHER}:8000"
    updated = node(checks.update_policy, name, FULL)
    assert updated.network_policy.egress == FULL
    assert node(checks.probe_from_guest, name, [target])[target].startswith("open")
    node(checks.update_policy, name, ALLOW_LIST, [(f"{INTERNET}/32", [8000])])
    assert node(checks.probe_from_guest, name, [target])[target].startswith("blocked")
    assert node(checks.get, name).network_policy.allow[0].cidr == f"{INTERNET}/32"


def test_invalid_policy_is_rejected_with_the_rule_named(node, sandboxes):
    with pytest.raises(RemoteRpcError) as error:
        node(checks.update_policy, sandboxes["none"].name, ALLOW_LIST, [("300.1.2.3/8", [80])])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allow[0].cidr" in error.value.details()
    with pytest.raises(RemoteRpcError) as error:
        node(checks.update_policy, sandboxes["none"].name, ALLOW_LIST, [("10.0.0.0/8", [70000])])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_exposed_port_answers_from_the_host_and_is_gone_after_delete(node, sandboxes):
    sandbox = node(checks.create, NONE)
    node(checks.serve_in_guest, sandbox.name, GUEST_SERVER_PORT)
    target = f"{sandbox.ip_address}:{GUEST_SERVER_PORT}"
    assert node.on_node(checks.probe_from_host, [target])[target].startswith("blocked")  # not exposed yet
    port = node(checks.expose, sandbox.name, GUEST_SERVER_PORT)
    assert port.host_address == "127.0.0.1" and port.host_port > 0
    exposed = f"127.0.0.1:{port.host_port}"
    assert node.on_node(checks.probe_from_host, [exposed])[exposed] == f"open guest {sandbox.name.split('/')[1]}"
    assert list(node(checks.get, sandbox.name).exposed_ports) == [port]
    node(checks.delete, sandbox.name)
    assert not node.on_node(checks.tcp_open, "127.0.0.1", port.host_port)
    state = node.on_node(checks.host_network_state, node.portable_stack)
    assert sandbox.name.split("/")[1] not in state["attachments"]
    assert f"{sandbox.ip_address} . {GUEST_SERVER_PORT}" not in state["ruleset"]


def test_fork_gets_its_own_address_and_keeps_the_policy(node, sandboxes):
    source = sandboxes["full"]
    (clone,) = node(checks.fork, source.name)
    try:
        assert clone.ip_address and clone.ip_address != source.ip_address
        assert clone.network_policy.egress == FULL
        code, out, _ = node(checks.run, clone.name, ["ip", "-4", "-o", "addr", "show"])
        assert f"inet {clone.ip_address}/" in out and f"inet {source.ip_address}/" not in out
        target = f"{INTERNET}:8000"
        assert node(checks.probe_from_guest, clone.name, [target])[target] == f"open internet {target}"
        # The source kept its address and still works.
        assert node(checks.probe_from_guest, source.name, [target])[target] == f"open internet {target}"
    finally:
        node(checks.delete, clone.name)


def test_network_service_killed_during_delete_leaves_no_device_or_rule(node, sandboxes):
    sandbox = node(checks.create, FULL)
    sandbox_id = sandbox_key("default", sandbox.name.split("/")[1])  # the node's records use the cluster id
    before = node.on_node(checks.host_network_state, node.portable_stack)
    tap = next(
        a.tap_device for a in node.on_node(checks.attachments, node.portable_stack) if a.sandbox_id == sandbox_id
    )
    assert tap in before["taps"] and f"sandbox_{sandbox_id.replace('-', '_')}" in before["ruleset"]
    old_pid = node.on_node(checks.network_service_pid, node.portable_stack)
    os.kill(old_pid, signal.SIGKILL)
    node(checks.delete, sandbox.name)  # compute cannot reach the network service now
    # A create meanwhile waits for the restarted service instead of failing.
    during = node(checks.create, FULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            state = node.on_node(checks.host_network_state, node.portable_stack)
            if node.on_node(checks.network_service_pid, node.portable_stack) != old_pid and tap not in state["taps"]:
                break
        except (StopIteration, RemoteRpcError, RuntimeError):
            pass  # not registered again yet
        assert time.monotonic() < deadline, "the restarted network service did not remove the sandbox's TAP"
        time.sleep(0.5)
    assert sandbox_id not in state["attachments"]
    assert f"sandbox_{sandbox_id.replace('-', '_')}" not in state["ruleset"]
    assert tap not in state["ruleset"]  # (its address may already serve a new VM: addresses are reused)
    # The bridge kept its own MAC (a bridge without one takes a port's, which changes as TAPs go).
    assert state["bridge_mac"] == before["bridge_mac"] == "0a:58:0a:d5:00:01"
    # The others were rebuilt, not lost.
    target = f"{INTERNET}:8000"
    assert node(checks.probe_from_guest, sandboxes["full"].name, [target])[target].startswith("open")
    assert during.ip_address and during.ip_address != sandboxes["full"].ip_address
    assert node(checks.probe_from_guest, during.name, [target])[target].startswith("open")
    node(checks.delete, during.name)


def test_policy_and_exposed_ports_over_http_json(node, sandboxes):
    base, key = f"http://127.0.0.1:{node.http_port}", node.stack.admin_key
    name = sandboxes["full"].name
    status, body = node.on_node(
        checks.http_json,
        base,
        key,
        "PATCH",
        f"/v1/{name}?updateMask=networkPolicy",
        {"networkPolicy": {"egress": "EGRESS_MODE_ALLOW_LIST", "allow": [{"cidr": f"{INTERNET}/32", "ports": [8001]}]}},
    )
    assert status == 200, body
    assert body["sandbox"]["networkPolicy"].get("allow") == [{"cidr": f"{INTERNET}/32", "ports": [8001]}]
    results = node(checks.probe_from_guest, name, [f"{INTERNET}:8000", f"{INTERNET}:8001"])
    assert results[f"{INTERNET}:8000"].startswith("blocked") and results[f"{INTERNET}:8001"].startswith("open")
    status, body = node.on_node(
        checks.http_json,
        base,
        key,
        "PATCH",
        f"/v1/{name}?updateMask=networkPolicy",
        {"networkPolicy": {"egress": "EGRESS_MODE_FULL"}},
    )
    assert status == 200 and body["sandbox"]["networkPolicy"]["egress"] == "EGRESS_MODE_FULL"
    status, body = node.on_node(checks.http_json, base, key, "POST", f"/v1/{name}:exposePort", {"guestPort": 0})
    assert status == 400 and "guest_port" in body["message"]
    status, body = node.on_node(
        checks.http_json, base, key, "POST", f"/v1/{name}:exposePort", {"guestPort": 9, "hostAddress": "not-an-address"}
    )
    assert status == 400 and "host_address" in body["message"]


def test_drift_is_repaired_deleted_rules_return_and_stray_taps_go(node, sandboxes):
    node.on_node(checks.tamper)
    deadline = time.monotonic() + 15
    while True:
        state = node.on_node(checks.host_network_state, node.portable_stack)
        if "table inet microvm" in state["ruleset"] and "mvtstray000000" not in state["taps"]:
            break
        assert time.monotonic() < deadline, "the network service did not repair the host"
        time.sleep(0.5)
    # Isolation holds again: the NONE sandbox is cut off, the others' policies are back.
    results = node(checks.probe_from_guest, sandboxes["none"].name, [f"{INTERNET}:8000", *node.service_targets])
    assert all(r.startswith("blocked") for r in results.values()), results
