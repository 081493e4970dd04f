"""Where a webhook may send events, and how a delivery proves it came from us.

SSRF: a webhook URL is chosen by a tenant and fetched by the gateway, from inside the installation's network. So
only `http` and `https`, no credentials in the URL, and only public addresses: a literal address is checked when the
webhook is created and before every attempt, and a host name's addresses are checked each time it is resolved, by
the resolver the connection then uses (a name that resolves to a public address at create time and to 127.0.0.1
later is refused then: no DNS rebinding). Loopback, private, link-local (the cloud metadata service,
169.254.169.254), shared, reserved and multicast addresses are refused unless an operator lets a network through
(`gateway.webhook_allowed_networks`, CIDRs). Redirects are not followed and no proxy from the environment is used.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.resolver import ThreadedResolver

from services.common.errors import InvalidArgument

URL_MOST_BYTES = 2048
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def reachable(address: str, allowed: tuple[Network, ...]) -> bool:
    """Whether a webhook may connect to `address`: a public one, or one in an allowed network."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == network.version and ip in network for network in allowed):
        return True
    return ip.is_global and not ip.is_multicast


def bad_url(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="BAD_WEBHOOK_URL")


def check_url(url: str, allowed: tuple[Network, ...]) -> str:
    """The URL, if a webhook may POST to it; INVALID_ARGUMENT saying why not otherwise."""
    if not url:
        raise bad_url("webhook url is required")
    if len(url.encode()) > URL_MOST_BYTES or not url.isprintable() or any(c.isspace() for c in url):
        raise bad_url(f"webhook url must be at most {URL_MOST_BYTES} bytes of printable characters without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad_url(f"webhook url does not parse: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise bad_url(f"webhook url must be http:// or https://, not {parts.scheme or 'without a scheme'}")
    if parts.username is not None or parts.password is not None:
        raise bad_url("webhook url must not carry a user or password: deliveries are signed (X-Mvm-Signature)")
    if parts.fragment:
        raise bad_url("webhook url must not have a #fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise bad_url("webhook url has no host")
    if port == 0:
        raise bad_url("webhook url has port 0")
    literal = "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else host
    try:
        ipaddress.ip_address(literal)
    except ValueError:
        try:  # the old numeric forms a resolver still takes for an address: 127.1, 0x7f000001, 2130706433
            literal = socket.inet_ntoa(socket.inet_aton(literal))
        except OSError:
            return url  # a name: its addresses are checked whenever it is resolved
    if not reachable(literal, allowed):
        raise InvalidArgument(
            f"webhook url points at {host}, a loopback, private, link-local or otherwise non-public address; an "
            "operator may allow a network with gateway.webhook_allowed_networks",
            reason="WEBHOOK_TARGET_NOT_ALLOWED",
        )
    return url


class CheckedResolver(ThreadedResolver):
    """The system resolver, refusing a name that resolves to an address webhooks may not reach."""

    def __init__(self, allowed: tuple[Network, ...]) -> None:
        super().__init__()
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        found = await super().resolve(host, port, family)
        for result in found:
            if not reachable(result["host"], self.allowed):
                raise OSError(f"{host} resolves to {result['host']}, an address webhooks may not reach")
        return found


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` keyed with the webhook's secret."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
