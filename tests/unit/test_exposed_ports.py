"""Exposed ports: a host address from the allow-list (`network.expose_host_addresses`, loopback by default) and a
port from the configured range (`network.expose_port_range`, 30000-32767 by default), nothing else; and
UnexposePort takes back what ExposePort opened.

A whole one-node installation (fake VMM, networking on: bridge, TAPs, nftables) runs in a network namespace
of its own, so nothing of this host's network is touched; the calls run in there too (tests/exposure_checks.py)
and report what they saw, which the tests below judge.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from services.common.config import ConfigError
from services.common.settings import NetworkSettings
from tests.exposure_checks import ASKED, GUEST_PORT, HIGH, HOST_ADDRESS, LOW, OTHER_GUEST_PORT, observe
from tests.netns import run_in, sh

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")),
        reason="needs root, iproute2 and nftables (a network namespace of its own)",
    ),
]


# --- the tests -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seen():
    namespace = f"mvmut-ports-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", namespace)
    try:
        sh("ip", "link", "set", "lo", "up", namespace=namespace)
        sh("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1", namespace=namespace)
        sh("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", "uplink0", namespace=namespace)
        for device in ("uplink0", "uplink1"):
            sh("ip", "link", "set", device, "up", namespace=namespace)
        yield run_in(namespace, observe, timeout=200)
    finally:
        for pid in sh("ip", "netns", "pids", namespace, check=False).split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        sh("ip", "netns", "del", namespace, check=False)


def test_wildcard_and_non_loopback_host_addresses_are_refused(seen):
    for address in ("0.0.0.0", "::", "::1", HOST_ADDRESS):
        assert seen["refused"][address] == "INVALID_ARGUMENT HOST_ADDRESS_NOT_ALLOWED", address


def test_host_ports_outside_the_configured_range_are_refused(seen):
    for attempt in ("port 80", f"port {LOW - 1}", f"port {HIGH + 1}"):
        assert seen["refused"][attempt] == "INVALID_ARGUMENT HOST_PORT_OUT_OF_RANGE", attempt


def test_the_network_service_itself_refuses_them(seen):
    assert seen["refused_by_network"] == {
        "0.0.0.0": "INVALID_ARGUMENT HOST_ADDRESS_NOT_ALLOWED",
        "port 80": "INVALID_ARGUMENT HOST_PORT_OUT_OF_RANGE",
    }


def test_refused_requests_leave_nothing_listening_or_listed(seen):
    assert seen["after_refusals"] == {"listed": [], "port 80": "refused"}


def test_default_exposure_is_loopback_on_a_port_of_the_range_and_reaches_the_guest(seen):
    assert seen["chosen"].startswith("OK 127.0.0.1:"), seen["chosen"]
    port = int(seen["chosen"].rpartition(":")[2])
    assert LOW <= port <= HIGH
    assert seen["through_chosen"].endswith(f":{GUEST_PORT}") and seen["through_chosen"].startswith("guest sbx-")


def test_a_host_port_asked_for_inside_the_range_is_the_one_used(seen):
    assert seen["asked"] == f"OK 127.0.0.1:{ASKED}"
    assert seen["through_asked"].endswith(f":{OTHER_GUEST_PORT}")
    chosen = int(seen["chosen"].rpartition(":")[2])
    assert seen["listed"] == [(GUEST_PORT, "127.0.0.1", chosen), (OTHER_GUEST_PORT, "127.0.0.1", ASKED)]


def test_unexpose_closes_the_listener_and_forgets_the_mapping(seen):
    chosen = int(seen["chosen"].rpartition(":")[2])
    assert seen["unexposed"] == [(GUEST_PORT, "127.0.0.1", chosen)]
    assert seen["through_chosen_after"] == "refused"
    assert seen["through_asked_after"].endswith(f":{OTHER_GUEST_PORT}")  # the other mapping is untouched
    assert seen["listed_after"] == [(OTHER_GUEST_PORT, "127.0.0.1", ASKED)]
    assert seen["attached_after"] == [[(OTHER_GUEST_PORT, "127.0.0.1", ASKED)]]


def test_another_tenant_cannot_unexpose_it(seen):
    assert seen["unexposed_by_another_tenant"] == "NOT_FOUND SANDBOX_NOT_FOUND"
    assert seen["through_chosen_after_intruder"].endswith(f":{GUEST_PORT}")


def test_unexposing_what_is_not_exposed_is_not_found(seen):
    assert seen["unexposed_again"] == "NOT_FOUND EXPOSED_PORT_NOT_FOUND"


def test_unexpose_over_http_json(seen):
    status, body = seen["http_unexpose"]
    assert status == 200, body
    assert body["ports"] == [{"guestPort": OTHER_GUEST_PORT, "hostAddress": "127.0.0.1", "hostPort": ASKED}]
    assert seen["through_asked_after_http"] == "refused"
    assert seen["listed_after_http"] == []


def test_a_recorded_mapping_the_settings_refuse_is_not_listened_on_and_can_be_removed(seen):
    assert seen["legacy_wildcard_80"] == "refused"
    assert seen["legacy_unexposed"] == [(GUEST_PORT, "0.0.0.0", 80)]


def test_mvm_expose_and_unexpose(seen):
    code, out = seen["cli_expose"]
    assert code == 0 and out.startswith("127.0.0.1:") and out.endswith(f":{GUEST_PORT}"), out
    assert seen["cli_unexpose"] == (0, f"closed {out}")
    code, out = seen["cli_unexpose_again"]
    assert code == 2 and "NOT_FOUND" in out, out


# --- settings ------------------------------------------------------------------------------------------------
def test_default_settings_allow_loopback_and_the_documented_range():
    settings = NetworkSettings()
    assert settings.expose_host_addresses == ["127.0.0.1"]
    assert settings.expose_port_range == f"{LOW}-{HIGH}"
    settings.validate()


@pytest.mark.parametrize(
    "values",
    [
        {"expose_port_range": "32767-30000"},
        {"expose_port_range": "0-100"},
        {"expose_port_range": "30000-70000"},
        {"expose_port_range": "30000"},
        {"expose_port_range": "a-b"},
        {"expose_host_addresses": []},
        {"expose_host_addresses": ["localhost"]},
        {"expose_host_addresses": ["10.0.0.0/8"]},
    ],
)
def test_settings_refuse_a_bad_range_or_allow_list(values):
    with pytest.raises(ConfigError):
        NetworkSettings(**values).validate()


def test_an_operator_may_list_ipv6_loopback_or_a_wildcard_explicitly():
    NetworkSettings(expose_host_addresses=["127.0.0.1", "::1", "0.0.0.0"]).validate()
