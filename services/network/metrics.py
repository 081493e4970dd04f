"""The network service's Prometheus metrics: guest addresses of this node's pool in use and free, and the sandbox TAP
devices on the host. Read before each scrape (ServiceMetrics.before_scrape): the addresses from their records in etcd
(what allocation itself trusts), the TAPs from the host (`ip link`: a device leaked by a crash counts too). Only a
node with networking on has a pool and TAPs; one without serves none of these."""

from __future__ import annotations

from services.common.metrics import ServiceMetrics


class NetworkMetrics:
    def __init__(self, metrics: ServiceMetrics, network) -> None:
        self.network = network
        pool = network.pool.network
        # Every host address but the gateway's (IPv4 hosts exclude the network and broadcast addresses).
        self.subnet = str(pool)
        self.capacity = pool.num_addresses - (2 if pool.version == 4 else 1) - 1
        self.addresses: dict[tuple[str, str], int] = {}
        self.taps: dict[tuple, int] = {}
        metrics.gauge_callback(
            "microvm_ip_addresses",
            "Guest addresses of this node's pool by subnet and state (used, free)",
            ["subnet", "state"],
            lambda: self.addresses,
        )
        metrics.gauge_callback("microvm_tap_devices", "Sandbox TAP devices on this host", [], lambda: self.taps)
        metrics.before_scrape(self.refresh)

    async def refresh(self) -> None:
        used = len(await self.network.pool.allocations())
        self.addresses = {(self.subnet, "used"): used, (self.subnet, "free"): max(0, self.capacity - used)}
        self.taps = {(): len(await self.network.links.taps())}
