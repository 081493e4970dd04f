"""Where webhooks may go (services/gateway/webhook_targets.py): public addresses only unless an operator allows a
network, names checked at every resolution (no DNS rebinding), and the signature a receiver recomputes."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.common.errors import InvalidArgument
from services.gateway.webhook_targets import CheckedResolver, check_url, networks, reachable, signature


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
    ],
)
def test_only_public_addresses_are_reachable_by_default(address, public):
    assert reachable(address, ()) is public


def test_an_allowed_network_lets_its_addresses_through_and_no_others():
    allowed = networks(["127.0.0.0/8", "10.1.0.0/16"])
    assert reachable("127.0.0.1", allowed) and reachable("10.1.2.3", allowed) and reachable("::ffff:10.1.0.9", allowed)
    assert not reachable("10.2.0.1", allowed) and not reachable("::1", allowed)


def test_urls_that_pass():
    for url in ("https://hooks.example.com/mvm?team=a", "http://93.184.215.14:8080/hook", "https://hooks.example.com."):
        assert check_url(url, ()) == url


@pytest.mark.parametrize(
    "url", ["http://localhost:8080/x", "http://api.localhost/x", "http://127.1/x", "https://hooks.example.com/a b"]
)
def test_loopback_names_and_malformed_urls_are_refused(url):
    with pytest.raises(InvalidArgument):
        check_url(url, ())


async def test_a_name_resolving_to_a_refused_address_is_refused_when_it_is_resolved():
    with pytest.raises(OSError, match="an address webhooks may not reach"):
        await CheckedResolver(()).resolve("localhost", 80)
    found = await CheckedResolver(networks(["127.0.0.0/8", "::1/128"])).resolve("localhost", 80)
    assert found and all(result["host"] in ("127.0.0.1", "::1") for result in found)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"type":"SANDBOX_EVENT_TYPE_CREATED"}'
    expected = hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("whsec_x", 1700000000, body) == f"sha256={expected}"
