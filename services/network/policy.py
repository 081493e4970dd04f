"""Egress policy: validation shared by the gateway (public input) and the network service (enforcement)."""

from __future__ import annotations

import ipaddress

from microvm.types.v1 import network_pb2
from services.common.errors import InvalidArgument

MAX_RULES = 64
MAX_PORTS_PER_RULE = 32


def normalized_policy(policy: network_pb2.NetworkPolicy) -> network_pb2.NetworkPolicy:
    """The policy with UNSPECIFIED turned into NONE and every CIDR in canonical form.

    Raises InvalidArgument naming the rule when a CIDR, a port or the mode is wrong, and when an allow-list
    is given with a mode that ignores it (a caller who sent one would otherwise believe it applies)."""
    egress = policy.egress or network_pb2.EGRESS_MODE_NONE
    if egress not in network_pb2.EgressMode.values():
        raise InvalidArgument(f"network_policy.egress {policy.egress} is not an egress mode", reason="INVALID_POLICY")
    if policy.allow and egress != network_pb2.EGRESS_MODE_ALLOW_LIST:
        raise InvalidArgument(
            "network_policy.allow is only used with egress EGRESS_MODE_ALLOW_LIST", reason="INVALID_POLICY"
        )
    if len(policy.allow) > MAX_RULES:
        raise InvalidArgument(
            f"network_policy.allow has {len(policy.allow)} rules; at most {MAX_RULES}", reason="INVALID_POLICY"
        )
    result = network_pb2.NetworkPolicy(egress=egress)
    for index, rule in enumerate(policy.allow):
        try:
            network = ipaddress.ip_network(rule.cidr.strip(), strict=False)
        except ValueError:
            raise InvalidArgument(
                f"network_policy.allow[{index}].cidr {rule.cidr!r} is not an IPv4 or IPv6 network in CIDR notation",
                reason="INVALID_POLICY",
            ) from None
        if len(rule.ports) > MAX_PORTS_PER_RULE:
            raise InvalidArgument(
                f"network_policy.allow[{index}] has {len(rule.ports)} ports; at most {MAX_PORTS_PER_RULE}",
                reason="INVALID_POLICY",
            )
        for port in rule.ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(
                    f"network_policy.allow[{index}].ports: {port} is outside 1..65535", reason="INVALID_POLICY"
                )
        result.allow.add(cidr=str(network), ports=sorted(set(rule.ports)))
    return result


def describe(policy: network_pb2.NetworkPolicy) -> str:
    mode = network_pb2.EgressMode.Name(policy.egress or network_pb2.EGRESS_MODE_NONE)
    return mode.removeprefix("EGRESS_MODE_").lower()
