"""NodeNetwork: this node's sandbox networking, kept equal to the attachment records in etcd.

Every change (attach, detach, policy, exposure) writes the records first and then converges the host: TAP
devices, nftables rules, port listeners. `reconcile` does the same for the whole node (at start and
periodically): attachments of VMs that no longer exist are removed, TAPs and addresses nobody owns are
deleted, missing devices and listeners come back. One lock orders all of it inside this process.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import structlog

from microvm.types.v1 import network_pb2
from services.common.config import ConfigError
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.records import VMS, Records
from services.common.settings import NetworkSettings
from services.network.addresses import AddressPool
from services.network.attachments import Attachment, AttachmentStore, ExposedPort, mac_for
from services.network.exposure import ExposureRules, check_ports, parse_host_address
from services.network.firewall import SandboxFirewall
from services.network.links import HostLinks, new_tap_name
from services.network.policy import normalized_policy
from services.network.ports import PortForwarder

log = structlog.get_logger()


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's name servers that a guest can use (loopback resolvers such as systemd-resolved's are not)."""
    servers = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return servers
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback and not address.is_link_local:
                servers.append(str(address))
    return servers[:3]


class NodeNetwork:
    def __init__(self, settings: NetworkSettings, etcd, node: str) -> None:
        self.settings = settings
        self.etcd = etcd
        self.node = node
        self.subnet = ipaddress.ip_network(settings.subnet)
        self.pool = AddressPool(etcd, node, settings.subnet)
        self.store = AttachmentStore(etcd, node)
        self.links = HostLinks(
            settings.bridge, f"{self.pool.gateway}/{self.subnet.prefixlen}", mac_for(str(self.pool.gateway))
        )
        self.firewall = SandboxFirewall(
            settings.bridge,
            str(self.subnet),
            tuple(str(ipaddress.ip_network(n, strict=False)) for n in settings.denied_destinations),
        )
        self.ports = PortForwarder()
        self.rules = ExposureRules.from_settings(settings)
        self.refused: set[tuple[str, int]] = set()  # recorded mappings the rules refuse (warned about once)
        self.dns_servers = list(settings.dns_servers) or host_resolvers()
        self.lock = asyncio.Lock()
        # Rule convergences asked for and applied: a convergence that starts after a change includes it, so
        # changes made while one runs share the next (a fork's clones attach together: one nft run, not ten).
        self._converging = asyncio.Lock()
        self._rules_asked = self._rules_applied = 0

    async def start(self) -> None:
        try:
            await self.links.ensure_bridge()
            await self.reconcile()
        except (FileNotFoundError, PermissionError, FailedPrecondition) as exc:
            # Not a transient failure: say what the host lacks and how to run without it.
            raise ConfigError(
                f"networking: true needs iproute2, nftables and CAP_NET_ADMIN on this host "
                f"({getattr(exc, 'message', None) or exc}); install them and run the network "
                "service as root, or set `networking: false`"
            ) from None

    async def _converge_rules(self) -> None:
        """Returns once the host's rules were made from the records as they are now, or later."""
        self._rules_asked += 1
        asked = self._rules_asked
        async with self._converging:
            if self._rules_applied >= asked:
                return  # a convergence that began after this change was asked for has applied it
            covered = self._rules_asked
            await self.firewall.apply(list((await self.store.all()).values()))
            self._rules_applied = covered

    async def _get(self, sandbox_id: str) -> Attachment:
        attachment = await self.store.get(sandbox_id)
        if attachment is None:
            raise NotFound(
                f"sandbox {sandbox_id} has no network attachment on node {self.node}", reason="ATTACHMENT_NOT_FOUND"
            )
        return attachment

    # --- changes ---------------------------------------------------------------------------------------
    async def attach(self, sandbox_id: str, policy: network_pb2.NetworkPolicy, from_sandbox_id: str = "") -> Attachment:
        """The sandbox's attachment with `policy`: created (address, TAP, rules), or moved from `from_sandbox_id`
        (a pooled VM handed out keeps its device and address), or the existing one (idempotent)."""
        if not sandbox_id:
            raise InvalidArgument("sandbox_id is required")
        policy = normalized_policy(policy)
        async with self.lock:
            existing = await self.store.get(sandbox_id)
            if from_sandbox_id:
                if existing is not None:
                    raise AlreadyExists(
                        f"sandbox {sandbox_id} already has a network attachment", reason="ATTACHMENT_EXISTS"
                    )
                attachment = await self._get(from_sandbox_id)
                attachment.sandbox_id = sandbox_id
                attachment.network_policy = policy
                if not await self.store.move(from_sandbox_id, attachment):
                    raise FailedPrecondition(
                        f"the attachment of {from_sandbox_id} changed meanwhile", reason="ATTACHMENT_CHANGED"
                    )
                await self._converge_rules()
                return attachment
            if existing is not None:
                existing.network_policy = policy
                await self.store.put(existing)
                await self.links.create_tap(existing.tap_device)
                await self._converge_rules()
                return existing
            address = await self.pool.allocate(sandbox_id)
            attachment = Attachment(
                sandbox_id=sandbox_id,
                tap_device=new_tap_name(),
                address=address,
                prefix_length=self.subnet.prefixlen,
                gateway=str(self.pool.gateway),
                mac_address=mac_for(address),
                dns_servers=self.dns_servers,
            )
            attachment.network_policy = policy
            try:
                await self.store.put(attachment)
                await self.links.create_tap(attachment.tap_device)
            except BaseException:
                await self._remove(attachment)
                raise
        try:
            await self._converge_rules()  # outside the lock: attaches made meanwhile share it
        except BaseException:
            async with self.lock:
                await self._remove(attachment)
            raise
        log.info("sandbox_attached", sandbox=sandbox_id, tap=attachment.tap_device, address=address)
        return attachment

    async def detach(self, sandbox_id: str) -> None:
        async with self.lock:
            attachment = await self.store.get(sandbox_id)
            if attachment is None:
                await self.pool.release(sandbox_id)  # an allocation whose attach never finished
                return
            await self._remove(attachment)
            await self._converge_rules()
        log.info("sandbox_detached", sandbox=sandbox_id)

    async def _remove(self, attachment: Attachment) -> None:
        """Listeners, device, record, address: in that order, so a crash midway leaves a record to retry from."""
        for port in attachment.exposed_ports:
            await self.ports.close(port.host_address, port.host_port)
        await self.links.delete_tap(attachment.tap_device)
        await self.store.delete(attachment.sandbox_id)
        await self.pool.release(attachment.sandbox_id)

    async def set_policy(self, sandbox_id: str, policy: network_pb2.NetworkPolicy) -> Attachment:
        policy = normalized_policy(policy)
        async with self.lock:
            attachment = await self._get(sandbox_id)
            attachment.network_policy = policy
            await self.store.put(attachment)
            await self._converge_rules()
            return attachment

    async def expose(self, sandbox_id: str, guest_port: int, host_address: str, host_port: int) -> ExposedPort:
        """Listens on `host_address:host_port` (an allowed address, a port of the range; the first address and a
        free port when not given) and relays to the guest's `guest_port`. Exposing a guest port again on the same
        address returns the existing mapping."""
        check_ports(guest_port, host_port)
        host_address = self.rules.host_address(host_address)
        self.rules.check_host_port(host_port)
        async with self.lock:
            attachment = await self._get(sandbox_id)
            for port in attachment.exposed_ports:
                if (
                    port.guest_port == guest_port
                    and port.host_address == host_address
                    and host_port in (0, port.host_port)
                ):
                    return port
            if len(attachment.exposed_ports) >= self.settings.max_exposed_ports_per_sandbox:
                raise ResourceExhausted(
                    f"sandbox {sandbox_id} already exposes {len(attachment.exposed_ports)} ports (the most allowed)",
                    reason="TOO_MANY_EXPOSED_PORTS",
                )
            if host_port:
                host_port = await self.ports.open(host_address, host_port, attachment.address, guest_port)
            else:
                host_port = await self.ports.open_any(host_address, self.rules.ports, attachment.address, guest_port)
            port = ExposedPort(guest_port, host_address, host_port)
            attachment.exposed_ports.append(port)
            try:
                await self.store.put(attachment)
                await self._converge_rules()
            except BaseException:
                await self.ports.close(port.host_address, port.host_port)
                raise
            log.info(
                "port_exposed", sandbox=sandbox_id, guest_port=guest_port, host=f"{port.host_address}:{port.host_port}"
            )
            return port

    async def unexpose(self, sandbox_id: str, guest_port: int, host_address: str, host_port: int) -> list[ExposedPort]:
        """Removes the sandbox's mappings of `guest_port` (only those on `host_address` and `host_port` when given):
        the record first, then the listeners (their open connections end) and the rules. Returns what it removed;
        nothing when nothing matched or the sandbox has no attachment here (so a retry is harmless)."""
        check_ports(guest_port, host_port)
        host_address = parse_host_address(host_address)
        async with self.lock:
            attachment = await self.store.get(sandbox_id)
            if attachment is None:
                return []
            removed = [
                p
                for p in attachment.exposed_ports
                if p.guest_port == guest_port and host_address in ("", p.host_address) and host_port in (0, p.host_port)
            ]
            if not removed:
                return []
            attachment.exposed_ports = [p for p in attachment.exposed_ports if p not in removed]
            await self.store.put(attachment)
            for port in removed:
                await self.ports.close(port.host_address, port.host_port)
            await self._converge_rules()
        for port in removed:
            log.info(
                "port_unexposed",
                sandbox=sandbox_id,
                guest_port=guest_port,
                host=f"{port.host_address}:{port.host_port}",
            )
        return removed

    async def attachments(self) -> list[Attachment]:
        return sorted((await self.store.all()).values(), key=lambda a: a.sandbox_id)

    # --- convergence -----------------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, int]:
        """Makes the host match the records, and the records match the VMs that exist on this node."""
        counts = {"stale_attachments": 0, "stray_taps": 0, "stray_addresses": 0, "listeners_opened": 0}
        async with self.lock:
            attachments = await self.store.all()  # read before the VMs: a newer VM cannot look stale
            vms = {s.parts[1] for s in await Records(self.etcd).list(VMS, self.node)}
            for sandbox_id in [s for s in attachments if s not in vms]:
                log.info("stale_attachment_removed", sandbox=sandbox_id)
                await self._remove(attachments.pop(sandbox_id))
                counts["stale_attachments"] += 1
            taps = await self.links.taps()
            wanted_taps = {a.tap_device for a in attachments.values()}
            for tap in taps - wanted_taps:
                await self.links.delete_tap(tap)
                counts["stray_taps"] += 1
            for tap in wanted_taps - taps:
                await self.links.create_tap(tap)
            in_use = {a.address for a in attachments.values()}
            for address in await self.pool.allocations():
                if address not in in_use:
                    await self.pool.forget(address)
                    counts["stray_addresses"] += 1
            wanted_ports = {}
            for attachment in attachments.values():
                for port in attachment.exposed_ports:
                    if self.rules.allows(port.host_address, port.host_port):
                        wanted_ports[(port.host_address, port.host_port)] = (attachment.address, port.guest_port)
                    elif (port.host_address, port.host_port) not in self.refused:
                        # Recorded before the settings were narrowed: nothing listens outside them.
                        self.refused.add((port.host_address, port.host_port))
                        log.warning(
                            "exposed_port_not_allowed",
                            sandbox=attachment.sandbox_id,
                            host=f"{port.host_address}:{port.host_port}",
                            allowed=",".join(self.rules.addresses),
                            range=self.rules.port_bounds,
                        )
            for key in set(self.ports.listeners) - set(wanted_ports):
                await self.ports.close(*key)
            for (host_address, host_port), (guest, guest_port) in wanted_ports.items():
                if (host_address, host_port) not in self.ports.listeners:
                    try:
                        await self.ports.open(host_address, host_port, guest, guest_port)
                        counts["listeners_opened"] += 1
                    except FailedPrecondition as exc:
                        log.warning("exposed_port_unavailable", host=f"{host_address}:{host_port}", error=exc.message)
            async with self._converging:  # not between another convergence's read and its apply
                await self.firewall.ensure(list(attachments.values()))
        if any(counts.values()):
            log.info("network_reconciled", **counts)
        return counts

    async def close(self) -> None:
        await self.ports.close_all()
