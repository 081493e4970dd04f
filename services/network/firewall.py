"""SandboxFirewall: the node's nftables rules, rendered from the attachments and replaced in one transaction.

Two tables belong to us, `inet microvm` and `bridge microvm`; nothing else on the host is touched. Each
change re-renders both and loads them with one `nft -f` (delete + add inside one transaction), so the kernel
switches from the old rule set to the new one atomically and no rule of a deleted sandbox can survive.
The rules stay in the kernel while the network service is down: isolation does not depend on it running.

inet microvm:
  input     sandboxes never open connections to the host (etcd, gateway, any service, any host address)
  output    the host reaches a sandbox only on its exposed ports (the port forwarder connects from here)
  forward   nothing enters a sandbox from outside but replies; every packet that leaves goes through its own
            chain `sandbox_<id>` picked by source address (the bridge table guarantees the address is
            the sandbox's own): other sandboxes and the operator's denied destinations (cloud metadata by
            default) are dropped first, then the sandbox's policy applies
  postrouting  masquerade of sandbox traffic leaving the node
bridge microvm:
  prerouting  anti-spoofing per TAP: source MAC, IPv4 and ARP sender must be the sandbox's; no IPv6
  forward     no frame from one sandbox's TAP to another's (also enforced by isolated bridge ports)
"""

from __future__ import annotations

import ipaddress
import time

from microvm.types.v1 import network_pb2
from services.network.attachments import Attachment
from services.network.links import TAP_PREFIX, run

TABLE = "microvm"


def chain_name(sandbox_id: str) -> str:
    # Sandbox ids are [a-z0-9-]; `_` never occurs in them, so the mapping is one to one.
    return "sandbox_" + sandbox_id.replace("-", "_")


def _egress_rules(attachment: Attachment, subnet: str, denied: tuple[str, ...]) -> list[str]:
    policy = attachment.network_policy
    rules = [f'ip daddr {subnet} drop comment "other sandboxes"']
    for family in ("ip", "ip6"):
        networks = [n for n in denied if ipaddress.ip_network(n).version == (4 if family == "ip" else 6)]
        if networks:
            # The operator's deny list (cloud metadata by default) wins over any sandbox's policy.
            rules.append(f'{family} daddr {{ {", ".join(networks)} }} drop comment "denied by the operator"')
    if policy.egress == network_pb2.EGRESS_MODE_FULL:
        return rules + ["accept"]
    if policy.egress == network_pb2.EGRESS_MODE_ALLOW_LIST:
        for rule in policy.allow:
            family = "ip" if ipaddress.ip_network(rule.cidr).version == 4 else "ip6"
            if rule.ports:
                ports = ", ".join(str(p) for p in rule.ports)
                rules.append(f"{family} daddr {rule.cidr} tcp dport {{ {ports} }} accept")
                rules.append(f"{family} daddr {rule.cidr} udp dport {{ {ports} }} accept")
            else:
                rules.append(f"{family} daddr {rule.cidr} accept")
    rules.append("counter drop")
    return rules


def render(attachments: list[Attachment], bridge: str, subnet: str, denied: tuple[str, ...] = ()) -> str:
    """The complete nft script for `attachments` (deterministic: the same input gives the same text)."""
    attachments = sorted(attachments, key=lambda a: a.sandbox_id)
    lines = [
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        "",
    ]
    exposed = [f"{a.address} . {p.guest_port}" for a in attachments for p in a.exposed_ports]
    sources = [f"{a.address} : jump {chain_name(a.sandbox_id)}" for a in attachments]

    lines.append(f"table inet {TABLE} {{")
    lines += [
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname "{bridge}" ct state established,related accept',
        f'    iifname "{bridge}" counter drop comment "sandboxes never reach the host"',
        "  }",
    ]
    lines += [
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f'    oifname "{bridge}" ct state established,related accept',
    ]
    if exposed:
        lines.append(f'    oifname "{bridge}" ip daddr . tcp dport {{ {", ".join(exposed)} }} accept')
    lines += [f'    oifname "{bridge}" counter drop comment "only exposed ports"', "  }"]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    oifname "{bridge}" ct state established,related accept',
        f'    oifname "{bridge}" counter drop comment "nothing enters a sandbox from outside"',
    ]
    # No shortcut for established connections on the way out: every packet a sandbox sends is checked
    # against its current policy, so a narrowed policy stops open connections too.
    if sources:
        lines.append(f'    iifname "{bridge}" ip saddr vmap {{ {", ".join(sources)} }}')
    lines += [f'    iifname "{bridge}" counter drop comment "unknown source"', "  }"]
    lines += [
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {subnet} oifname != "{bridge}" masquerade',
        "  }",
    ]
    for attachment in attachments:
        lines.append(f"  chain {chain_name(attachment.sandbox_id)} {{")
        lines += [f"    {rule}" for rule in _egress_rules(attachment, subnet, denied)]
        lines.append("  }")
    lines += ["}", ""]

    ports = [f'"{a.tap_device}" : jump port_{a.tap_device}' for a in attachments]
    lines.append(f"table bridge {TABLE} {{")
    lines += ["  chain prerouting {", "    type filter hook prerouting priority filter; policy accept;"]
    if ports:
        lines.append(f"    iifname vmap {{ {', '.join(ports)} }}")
    lines += [f'    iifname "{TAP_PREFIX}*" counter drop comment "a TAP without attachment"', "  }"]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{TAP_PREFIX}*" oifname "{TAP_PREFIX}*" counter drop comment "sandbox to sandbox"',
        "  }",
    ]
    for a in attachments:
        lines += [
            f"  chain port_{a.tap_device} {{",
            f"    ether saddr != {a.mac_address} counter drop",
            f"    ether type arp arp saddr ip != {a.address} counter drop",
            f"    ether type ip ip saddr != {a.address} counter drop",
            "    ether type != { ip, arp } counter drop",
            "    accept",
            "  }",
        ]
    lines += ["}", ""]
    return "\n".join(lines)


class SandboxFirewall:
    def __init__(self, bridge: str, subnet: str, denied: tuple[str, ...] = (), refresh_seconds: float = 60.0) -> None:
        self.bridge = bridge
        self.subnet = subnet
        self.denied = denied
        self.refresh_seconds = refresh_seconds
        self.applied = ""
        self.applied_at = 0.0

    async def apply(self, attachments: list[Attachment]) -> None:
        script = render(attachments, self.bridge, self.subnet, self.denied)
        await run("nft", "-f", "-", stdin=script.encode())
        self.applied, self.applied_at = script, time.monotonic()

    async def ensure(self, attachments: list[Attachment]) -> bool:
        """Re-applies when the rules would differ, our tables went missing, or `refresh_seconds` passed (a
        rule changed by hand inside our tables is not visible from here); True if it applied."""
        script = render(attachments, self.bridge, self.subnet, self.denied)
        fresh = time.monotonic() - self.applied_at < self.refresh_seconds
        if script == self.applied and fresh and await self.present():
            return False
        await self.apply(attachments)
        return True

    async def present(self) -> bool:
        tables = await run("nft", "list", "tables", check=False)
        return f"table inet {TABLE}" in tables and f"table bridge {TABLE}" in tables

    async def remove(self) -> None:
        await run("nft", "delete", "table", "inet", TABLE, check=False)
        await run("nft", "delete", "table", "bridge", TABLE, check=False)
