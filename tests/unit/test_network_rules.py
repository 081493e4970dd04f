"""The nftables rules rendered from attachments: accepted by nft itself, and saying what the policy says."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from services.common.errors import InvalidArgument
from services.network.attachments import Attachment, ExposedPort, mac_for
from services.network.firewall import chain_name, render
from services.network.policy import normalized_policy

SUBNET = "10.213.0.0/20"


def attachment(sandbox_id: str, address: str, policy: sandbox_pb2.NetworkPolicy, ports=()) -> Attachment:
    a = Attachment(
        sandbox_id=sandbox_id,
        tap_device=f"mvt{address.split('.')[-1]:0>11}",
        address=address,
        prefix_length=20,
        gateway="10.213.0.1",
        mac_address=mac_for(address),
    )
    a.network_policy = normalized_policy(policy)
    a.exposed_ports = [ExposedPort(p, "127.0.0.1", 40000 + p) for p in ports]
    return a


def chain(script: str, sandbox_id: str) -> str:
    start = script.index(f"chain {chain_name(sandbox_id)} {{")
    return script[start : script.index("\n  }", start)]


def allow(*rules) -> sandbox_pb2.NetworkPolicy:
    policy = sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_ALLOW_LIST)
    for cidr, ports in rules:
        policy.allow.add(cidr=cidr, ports=ports)
    return policy


def test_each_mode_renders_its_own_chain():
    script = render(
        [
            attachment("sbx-none", "10.213.0.2", sandbox_pb2.NetworkPolicy()),
            attachment("sbx-full", "10.213.0.3", sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_FULL)),
            attachment("sbx-list", "10.213.0.4", allow(("198.51.100.2", [8000, 443]), ("2001:db8::/32", []))),
        ],
        "mvmbr0",
        SUBNET,
    )
    none, full, listed = (chain(script, s) for s in ("sbx-none", "sbx-full", "sbx-list"))
    for text in (none, full, listed):
        assert f"ip daddr {SUBNET} drop" in text  # other sandboxes come first, whatever the mode
    assert "accept" not in none and none.strip().splitlines()[-1].strip() == "counter drop"
    assert full.strip().splitlines()[-1].strip() == "accept"
    assert "ip daddr 198.51.100.2/32 tcp dport { 443, 8000 } accept" in listed
    assert "ip daddr 198.51.100.2/32 udp dport { 443, 8000 } accept" in listed
    assert "ip6 daddr 2001:db8::/32 accept" in listed
    assert listed.strip().splitlines()[-1].strip() == "counter drop"
    assert "10.213.0.2 : jump sandbox_sbx_none" in script


def test_denied_destinations_come_before_any_policy():
    script = render(
        [
            attachment("sbx-full", "10.213.0.3", sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_FULL)),
            attachment("sbx-list", "10.213.0.4", allow(("169.254.169.254/32", [80]))),
        ],
        "mvmbr0",
        SUBNET,
        ("169.254.0.0/16", "fe80::/10"),
    )
    for sandbox_id in ("sbx-full", "sbx-list"):
        rules = [line.strip() for line in chain(script, sandbox_id).splitlines()[1:]]
        denied = rules.index('ip daddr { 169.254.0.0/16 } drop comment "denied by the operator"')
        assert rules.index('ip6 daddr { fe80::/10 } drop comment "denied by the operator"') == denied + 1
        assert all("accept" not in rule for rule in rules[:denied])
        assert any("accept" in rule for rule in rules[denied:])


def test_rendering_is_deterministic_and_replaces_whole_tables():
    attachments = [attachment(f"sbx-{i}", f"10.213.0.{i}", sandbox_pb2.NetworkPolicy(), ports=[80]) for i in (3, 2)]
    first, second = render(attachments, "mvmbr0", SUBNET), render(list(reversed(attachments)), "mvmbr0", SUBNET)
    assert first == second
    assert first.startswith("table inet microvm {}\ndelete table inet microvm\n")
    assert "ip daddr . tcp dport { 10.213.0.2 . 80, 10.213.0.3 . 80 } accept" in first


@pytest.mark.parametrize(
    "policy, message",
    [
        (allow(("not-a-network", [])), "allow[0].cidr"),
        (allow(("10.0.0.0/8", [0])), "outside 1..65535"),
        (
            sandbox_pb2.NetworkPolicy(
                egress=sandbox_pb2.EGRESS_MODE_FULL, allow=[sandbox_pb2.EgressRule(cidr="10.0.0.0/8")]
            ),
            "only used with",
        ),
        (allow(*[("10.0.0.0/8", [])] * 65), "at most 64"),
    ],
)
def test_invalid_policies_are_refused_naming_the_problem(policy, message):
    with pytest.raises(InvalidArgument) as error:
        normalized_policy(policy)
    assert message in error.value.message


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="nft --check needs root and nftables")
def test_nft_accepts_the_rendered_rules():
    script = render(
        [
            attachment("sbx-a", "10.213.0.2", allow(("198.51.100.0/24", [80]), ("2001:db8::/32", [53]))),
            attachment(
                "sbx-b", "10.213.0.3", sandbox_pb2.NetworkPolicy(egress=sandbox_pb2.EGRESS_MODE_FULL), ports=[8080, 22]
            ),
        ],
        "mvmbr0",
        SUBNET,
        ("169.254.0.0/16", "fe80::/10"),
    )
    # --check parses and validates in the kernel without changing anything.
    result = subprocess.run(["nft", "--check", "-f", "-"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
