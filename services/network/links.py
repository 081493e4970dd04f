"""HostLinks: the node's bridge and the sandboxes' TAP devices, driven through iproute2.

The bridge carries the guests' gateway address. Every TAP is a bridge port with `isolated on`, so the
kernel itself never forwards frames between two sandboxes (nftables drops them too). IPv6 is off on all
of them: guests are IPv4-only and must not reach anything through link-local addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
from pathlib import Path

from services.common.errors import FailedPrecondition

TAP_PREFIX = "mvt"  # with 11 hex digits: 14 characters, inside IFNAMSIZ


def new_tap_name() -> str:
    return f"{TAP_PREFIX}{secrets.token_hex(6)[:11]}"


class CommandFailed(FailedPrecondition):
    pass


async def run(*argv: str, stdin: bytes | None = None, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=30)
    if check and process.returncode != 0:
        raise CommandFailed(
            f"{' '.join(argv[:4])} failed: {err.decode().strip()[-1000:]}", reason="HOST_NETWORK_COMMAND_FAILED"
        )
    return out.decode()


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError:
        pass  # absent (no IPv6 in this kernel) or read-only: nothing to turn off


async def delete_tap(name: str) -> None:
    """Removes a TAP device; one already gone is fine."""
    await run("ip", "link", "delete", name, check=False)


class HostLinks:
    def __init__(self, bridge: str, gateway_cidr: str, bridge_mac: str) -> None:
        self.bridge = bridge
        self.gateway_cidr = gateway_cidr
        self.bridge_mac = bridge_mac

    async def _links(self) -> list[dict]:
        return json.loads(await run("ip", "-json", "link", "show") or "[]")

    async def ensure_bridge(self) -> None:
        """Creates the bridge with the gateway address (idempotent) and turns on IPv4 forwarding."""
        names = {link["ifname"] for link in await self._links()}
        if self.bridge not in names:
            await run("ip", "link", "add", self.bridge, "type", "bridge")
        # A bridge without a MAC of its own takes its lowest port's, and changes it when that TAP goes:
        # guests would keep sending to the gateway's old MAC. A fixed one is never replaced.
        await run("ip", "link", "set", self.bridge, "address", self.bridge_mac)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6", "1")
        addresses = json.loads(await run("ip", "-json", "addr", "show", "dev", self.bridge) or "[]")
        wanted = ipaddress.ip_interface(self.gateway_cidr)
        present = {
            f"{a['local']}/{a['prefixlen']}"
            for entry in addresses
            for a in entry.get("addr_info", [])
            if a.get("family") == "inet"
        }
        if str(wanted) not in present:
            await run("ip", "addr", "replace", str(wanted), "dev", self.bridge)
        await run("ip", "link", "set", self.bridge, "up")
        # Sandboxes with egress reach the outside through this host's routes.
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")

    async def taps(self) -> set[str]:
        return {link["ifname"] for link in await self._links() if link["ifname"].startswith(TAP_PREFIX)}

    async def create_tap(self, name: str) -> None:
        """The TAP on the bridge, isolated from the other ports, up, without IPv6 (idempotent). Two `ip` runs, not
        five: each is a process start, and a fork's clones attach one after the other."""
        if not os.path.exists(f"/sys/class/net/{name}"):
            await run("ip", "tuntap", "add", "dev", name, "mode", "tap")
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")  # before it is up: no link-local chatter
        steps = f"link set dev {name} master {self.bridge}\nlink set dev {name} type bridge_slave isolated on\n"
        await run("ip", "-batch", "-", stdin=(steps + f"link set dev {name} up\n").encode())

    async def delete_tap(self, name: str) -> None:
        await delete_tap(name)
