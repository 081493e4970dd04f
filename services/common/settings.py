"""The schema of the installation's config file: one dataclass per section.

Kept in one place so the supervisor can validate the whole file before it starts anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
from pathlib import Path

from services.common.config import ConfigError, ServiceSettings, parse_address


@dataclasses.dataclass
class GatewaySettings(ServiceSettings):
    listen: str = "127.0.0.1:50051"
    # HTTP/JSON translation of the public API.
    http_listen: str = "127.0.0.1:8080"
    # How browsers reach that HTTP port (desktop live-view URLs), e.g. https://sandbox.example.com behind a proxy;
    # empty: http://<http_listen>.
    public_http_url: str = ""
    # E2B compatibility (docs/e2b.md): the REST control plane the E2B SDKs call (`E2B_API_URL`) and their in-sandbox
    # traffic (`E2B_SANDBOX_URL`), each on its own address. Empty: that door is off. Port 0: any free port (the
    # bound address is published in the gateway's registration, metadata `e2b_api` and `e2b_sandbox`).
    e2b_api_listen: str = "127.0.0.1:3000"
    e2b_sandbox_listen: str = "127.0.0.1:3001"
    # The domain the E2B SDKs are told sandboxes live under (`domain` of a create): set it when a reverse proxy
    # serves `api.<domain>` and `<port>-<sandbox>.<domain>` (deploy/e2b/). Empty: the SDK's own E2B_DOMAIN.
    e2b_domain: str = ""
    # Where the noVNC client's files are (Debian's `novnc` package), served for desktop live views.
    novnc_dir: str = "/usr/share/novnc"
    # Lifetime of a sandbox when the caller gives none.
    default_timeout_seconds: int = 600
    # Longest lifetime a caller may ask for.
    max_timeout_seconds: int = 86400
    # Seconds between sweeps that delete expired sandboxes.
    reaper_interval_seconds: float = 1.0
    # Every public call needs `authorization: Bearer ...` (turn off only for a private development box).
    require_auth: bool = True
    # Per-API-key token bucket.
    rate_limit_per_second: float = 50.0
    rate_limit_burst: float = 200.0
    # Tenants whose admins operate the cluster (node administration: cordon, drain).
    operator_tenants: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    # Template builds (docs/templates.md): the longest a build may take, the most its build context may hold,
    # and the size of its builder VMs (a step's apt or pip install needs memory).
    template_build_timeout_seconds: int = 3600
    template_context_max_bytes: int = 1 << 30
    template_builder_vcpus: int = 2
    template_builder_memory_mib: int = 1024
    # Builders trust the host's CA bundle (copied into the image, with SSL_CERT_FILE and friends pointing at it),
    # so pip and npm work behind a TLS-intercepting proxy. Empty path: off.
    template_host_ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    # Seconds between sweeps that drop the images of superseded template builds (services/gateway/template_images.py).
    template_image_prune_seconds: float = 300.0
    # Webhooks (docs/events.md): each attempt's deadline, attempts per event (the first retry after
    # webhook_retry_seconds, each later wait twice the one before, at most 5 min), deliveries kept per webhook, and the
    # non-public networks (CIDRs) a webhook may reach: none by default (loopback, private, link-local are refused).
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 6
    webhook_retry_seconds: float = 2.0
    webhook_log_size: int = 50
    webhook_allowed_networks: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        parse_address(self.http_listen, key="gateway.http_listen")
        for key in ("e2b_api_listen", "e2b_sandbox_listen"):
            if getattr(self, key):
                parse_address(getattr(self, key), key=f"gateway.{key}")
        if self.webhook_max_attempts < 1 or self.webhook_log_size < 1 or self.webhook_timeout_seconds <= 0:
            raise ConfigError("gateway.webhook_max_attempts, webhook_log_size and webhook_timeout_seconds must be > 0")
        for network in self.webhook_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"gateway.webhook_allowed_networks: {network!r} is not a CIDR") from None
        if self.template_build_timeout_seconds < 10:
            raise ConfigError("gateway.template_build_timeout_seconds must be at least 10")
        if not 1 <= self.default_timeout_seconds <= self.max_timeout_seconds:
            raise ConfigError("gateway.default_timeout_seconds must be between 1 and max_timeout_seconds")


@dataclasses.dataclass
class ComputeSettings(ServiceSettings):
    # `auto`, `qemu` or `cloud-hypervisor`; `fake` runs each "VM" as a host process (tests only: no isolation).
    vmm: str = "auto"
    # `auto`, `kvm` or `tcg`. auto = kvm only where the CPU shows vmx/svm.
    accel: str = "auto"
    # Most vCPUs one VM may have, and that the node hands out in total.
    max_vcpus_per_vm: int = 8
    vcpus_total: int = 64
    # Most memory one VM may have, and that the node hands out in total, in MiB.
    max_memory_mib_per_vm: int = 8192
    memory_mib_total: int = 20480
    # TCG translation cache per VM in MiB (QEMU's default of 1 GiB dominates a guest's RSS).
    tcg_tb_size_mib: int = 64
    # Address space randomization of the guest's own processes (its kernel's `norandmaps` when off). "auto": on
    # under KVM, off under TCG, where every exec translated the dynamic loader and libc afresh at new addresses
    # and filled the translation cache, flushed every ~40 execs (exec `true` p50 35.6 -> 21.7 ms, p99 117 -> 29
    # ms). It hardens programs inside a guest; the guest's isolation from the host and other guests is the VM's.
    guest_aslr: str = "auto"
    # Seconds to wait for a booted guest's agent to answer.
    boot_timeout_seconds: float = 90.0
    # StopVm lets the guest write back its page cache for at most this long before the VMM is stopped.
    stop_timeout_seconds: float = 10.0
    # Where built images are cached; default: $MVM_CACHE_DIR/images or ~/.cache/microvm/images.
    image_cache_dir: str = ""
    # Where running VMs keep their RAM files (tmpfs: no writeback of guest memory to disk). Default:
    # /dev/shm/microvm-<uid> when /dev/shm exists, else <state_dir>/compute/ram.
    ram_dir: str = ""
    # Each template is booted once and snapshotted; creates of the default size restore from it.
    template_snapshots: bool = True
    # Restored, paused VMs kept ready per template (0 disables the pool).
    warm_pool_size: int = 2
    # The nice value a pool VM's VMM runs at until it is claimed: refilling the pool after a burst of creates
    # yields the CPU to the sandboxes just handed out (0: same priority as theirs).
    pool_fill_niceness: int = 10
    # After a claim, a refill waits this long while the pool still holds a ready VM, so the claimed sandbox's first
    # commands (a caller's usual create-then-run) do not share the CPU with a restore; an empty pool refills at once.
    pool_refill_delay_ms: int = 250
    # The size that template snapshots and the warm pool are made for.
    default_vcpus: int = 1
    default_memory_mib: int = 256
    # Another size gets a template snapshot (restores instead of cold boots) after this many cold boots,
    # for at most this many sizes per template.
    size_demand_threshold: int = 2
    extra_template_sizes: int = 3
    # A VM whose sandbox has named no longer this node for this many seconds (deleted while the node was away,
    # or moved off by a migration that could not remove it) is deleted; 0 keeps such VMs.
    orphan_grace_seconds: float = 300.0
    # Each running VM's CPU, memory, disk and network use is sampled this often (GetSandboxMetrics, `mvm top`);
    # an hour of samples is kept per VM.
    usage_sample_seconds: float = 5.0
    # Each VM's serial console is kept in `console.log`, moved to `console.log.1` (and so on) when it reaches
    # console_log_max_bytes; console_log_keep older files are kept. A VM's console never takes more than
    # max_bytes * (keep + 1) bytes on disk, whatever its guest writes and whether or not compute runs (while
    # compute is down the VMM drops the output; services/compute/console.py).
    console_log_max_bytes: int = 1 << 20
    console_log_keep: int = 1
    # Template build layers (a cache: a missing one is rebuilt) are dropped, least recently used first, once they
    # take more than this many bytes or were not used for this many days.
    layer_cache_max_bytes: int = 20 << 30
    layer_cache_max_age_days: float = 14.0
    qemu_binary: str = "qemu-system-x86_64"
    cloud_hypervisor_binary: str = "cloud-hypervisor"

    def aslr_for(self, accel: str) -> bool:
        """Whether guests under `accel` randomize their processes' address spaces (`guest_aslr`)."""
        return self.guest_aslr == "on" or (self.guest_aslr == "auto" and accel != "tcg")

    def ram_root(self, state_dir: str | Path) -> Path:
        if self.ram_dir:
            return Path(self.ram_dir)
        if os.path.isdir("/dev/shm"):
            digest = hashlib.sha256(str(Path(state_dir)).encode()).hexdigest()[:12]
            return Path(f"/dev/shm/microvm-{os.getuid()}") / digest
        return Path(state_dir) / "compute" / "ram"

    def validate(self) -> None:
        super().validate()
        if self.vmm not in ("auto", "qemu", "cloud-hypervisor", "fake"):
            raise ConfigError("compute.vmm must be auto, qemu, cloud-hypervisor or fake (tests only: no isolation)")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError("compute.accel must be auto, kvm or tcg")
        if not 1 <= self.max_vcpus_per_vm <= 64:
            raise ConfigError("compute.max_vcpus_per_vm must be between 1 and 64")
        if not 128 <= self.max_memory_mib_per_vm <= 262144:
            raise ConfigError("compute.max_memory_mib_per_vm must be between 128 and 262144")
        if not 0 <= self.warm_pool_size <= 64:
            raise ConfigError("compute.warm_pool_size must be between 0 and 64")
        if self.guest_aslr not in ("auto", "on", "off"):
            raise ConfigError("compute.guest_aslr must be auto, on or off")
        if not 0 <= self.pool_fill_niceness <= 19:
            raise ConfigError("compute.pool_fill_niceness must be between 0 and 19")
        if not 0 <= self.pool_refill_delay_ms <= 10000:
            raise ConfigError("compute.pool_refill_delay_ms must be between 0 and 10000")
        if not 0.05 <= self.usage_sample_seconds <= 300:
            raise ConfigError("compute.usage_sample_seconds must be between 0.05 and 300")
        if self.tcg_tb_size_mib < 8:
            raise ConfigError("compute.tcg_tb_size_mib must be at least 8")
        if self.size_demand_threshold < 1 or not 0 <= self.extra_template_sizes <= 16:
            raise ConfigError(
                "compute.size_demand_threshold must be at least 1 and compute.extra_template_sizes between 0 and 16"
            )
        if self.stop_timeout_seconds <= 0:
            raise ConfigError("compute.stop_timeout_seconds must be positive")
        if not 4 << 10 <= self.console_log_max_bytes <= 1 << 30 or not 0 <= self.console_log_keep <= 16:
            raise ConfigError(
                "compute.console_log_max_bytes must be between 4 KiB and 1 GiB and compute.console_log_keep "
                "between 0 and 16"
            )


@dataclasses.dataclass
class RelaySettings(ServiceSettings):
    # Seconds to wait for an agent channel to open (a guest's window is the agent's own, see agent.proto).
    connect_timeout_seconds: float = 10.0
    # What a guest may cost (services/relay/channel_guard.py): frames serving no stream per 10 s before its
    # channel is closed as a protocol violation; seconds a begun frame may stay incomplete; a quiet channel is
    # pinged every heartbeat and closed without an answer within the heartbeat timeout; data queued for a
    # stream's caller (and for all of a channel's) beyond the credit granted is a violation.
    junk_frames_per_10s: int = 1000
    frame_timeout_seconds: float = 10.0
    heartbeat_seconds: float = 20.0
    heartbeat_timeout_seconds: float = 30.0
    stream_buffer_mib: int = 8
    channel_buffer_mib: int = 64
    # Seconds between syncs of every guest's wall clock with the host's (also done on connect, restore and
    # resume); 0: only those.
    clock_sync_seconds: float = 60.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.connect_timeout_seconds <= 600:
            raise ConfigError("relay.connect_timeout_seconds must be between 0 and 600")
        if not 0 <= self.clock_sync_seconds <= 86400:
            raise ConfigError("relay.clock_sync_seconds must be between 0 (off) and 86400")
        if (
            self.junk_frames_per_10s < 1
            or self.frame_timeout_seconds <= 0
            or self.heartbeat_seconds <= 0
            or self.heartbeat_timeout_seconds <= 0
        ):
            raise ConfigError("relay limits (junk_frames_per_10s, frame_timeout_seconds, heartbeat_*) must be positive")
        if not 1 <= self.stream_buffer_mib <= self.channel_buffer_mib <= 4096:
            raise ConfigError("relay.stream_buffer_mib must be at least 1 and at most relay.channel_buffer_mib")

    def limits(self):
        from services.relay.channel_guard import ChannelLimits

        return ChannelLimits(
            junk_frames=self.junk_frames_per_10s,
            frame_seconds=self.frame_timeout_seconds,
            heartbeat_seconds=self.heartbeat_seconds,
            heartbeat_timeout_seconds=self.heartbeat_timeout_seconds,
            stream_buffer_bytes=self.stream_buffer_mib << 20,
            channel_buffer_bytes=self.channel_buffer_mib << 20,
        )


@dataclasses.dataclass
class NetworkSettings(ServiceSettings):
    # The node's bridge; its first address is the guests' gateway.
    bridge: str = "mvmbr0"
    # Guest addresses (IPv4); the same range may be used on every node (sandboxes leave a node NATed).
    subnet: str = "10.213.0.0/20"
    # Name servers given to guests; default: the host's non-loopback ones from /etc/resolv.conf.
    dns_servers: list[str] = dataclasses.field(default_factory=list)
    # Never reachable from any sandbox, whatever its policy: link-local holds cloud metadata services
    # (169.254.169.254 hands out the host's credentials on most clouds).
    denied_destinations: list[str] = dataclasses.field(default_factory=lambda: ["169.254.0.0/16", "fe80::/10"])
    # Seconds between sweeps that make devices, rules and listeners match the records in etcd.
    reconcile_interval_seconds: float = 5.0
    max_exposed_ports_per_sandbox: int = 16
    # Host addresses an exposed port may be bound on (IPv4 or IPv6); a request without one gets the first. A
    # wildcard (0.0.0.0, ::) or a public address exposes sandboxes to the network: list one only on purpose.
    expose_host_addresses: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1"])
    # Host ports an exposed port may use, `LOW-HIGH` inclusive; a request for port 0 gets a free one of them.
    # The default stays below Linux's ephemeral ports (32768-60999) and clear of the well-known ones.
    expose_port_range: str = "30000-32767"

    @property
    def expose_ports(self) -> range:
        low, _, high = self.expose_port_range.partition("-")
        return range(int(low), int(high) + 1)

    def validate(self) -> None:
        super().validate()
        try:
            network = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise ConfigError(f"network.subnet: {self.subnet!r} is not a network ({exc})") from None
        if network.version != 4 or not 16 <= network.prefixlen <= 28:
            raise ConfigError("network.subnet must be an IPv4 network between /16 and /28")
        for server in self.dns_servers:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise ConfigError(f"network.dns_servers: {server!r} is not an IPv4 address") from None
        for denied in self.denied_destinations:
            try:
                ipaddress.ip_network(denied, strict=False)
            except ValueError:
                raise ConfigError(f"network.denied_destinations: {denied!r} is not a network") from None
        if not 15 >= len(self.bridge) >= 1 or not self.bridge.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("network.bridge must be an interface name (1-15 letters, digits, - or _)")
        if self.reconcile_interval_seconds <= 0:
            raise ConfigError("network.reconcile_interval_seconds must be positive")
        if not self.expose_host_addresses:
            raise ConfigError("network.expose_host_addresses must name at least one address (e.g. 127.0.0.1)")
        for address in self.expose_host_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"network.expose_host_addresses: {address!r} is not an IP address") from None
        low, sep, high = self.expose_port_range.partition("-")
        if not (sep and low.strip().isdigit() and high.strip().isdigit() and 1 <= int(low) <= int(high) <= 65535):
            raise ConfigError(
                f"network.expose_port_range: {self.expose_port_range!r} is not LOW-HIGH with 1 <= LOW <= HIGH <= 65535"
            )


@dataclasses.dataclass
class SnapshotSettings(ServiceSettings):
    # Artifacts are split into chunks of this size; identical chunks are stored once.
    chunk_size_bytes: int = 4 << 20
    # Retention: snapshots kept per source sandbox (oldest go first; 0 = unlimited).
    keep_last_per_sandbox: int = 20
    # Seconds between retention and garbage-collection sweeps.
    gc_interval_seconds: float = 60.0
    # Where chunks live; default: <state_dir>/snapshot.
    store_dir: str = ""

    def validate(self) -> None:
        super().validate()
        if not 64 << 10 <= self.chunk_size_bytes <= 64 << 20:
            raise ConfigError("snapshot.chunk_size_bytes must be between 64 KiB and 64 MiB")
        if self.keep_last_per_sandbox < 0:
            raise ConfigError("snapshot.keep_last_per_sandbox must not be negative")


@dataclasses.dataclass
class AuthSettings(ServiceSettings):
    # Lifetime of a token bought with an API key.
    token_ttl_seconds: int = 900
    # A new signing key this often; older keys keep verifying until their tokens expired.
    signing_key_rotation_seconds: float = 86400.0
    # The key that seals signing keys in etcd (32 bytes, mode 0600, never in etcd); empty: <pki>/token-kek.key.
    # Every auth replica needs the same file.
    token_kek_file: str = ""


@dataclasses.dataclass
class SupervisorSettings:
    # etcd ports on loopback, started by the supervisor.
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    # Address etcd's client port listens on (the services always use loopback); 0.0.0.0 for other hosts.
    etcd_listen_host: str = "127.0.0.1"
    etcd_binary: str = "etcd"
    # Prometheus beside the stack (one-host layout), discovering every service from the registry; empty: none.
    # Not started, with a warning, where the binary is missing (`make apt` installs Debian's `prometheus`).
    prometheus_listen: str = "127.0.0.1:9090"
    prometheus_binary: str = "prometheus"
    prometheus_retention: str = "2d"
    # Restart back-off bounds, seconds.
    restart_backoff_initial_seconds: float = 0.2
    restart_backoff_max_seconds: float = 10.0

    def validate(self) -> None:
        for key in ("etcd_client_port", "etcd_peer_port"):
            port = getattr(self, key)
            if not 1 <= port <= 65535:
                raise ConfigError(f"supervisor.{key}: port {port} is outside 1..65535")
        if self.prometheus_listen:
            parse_address(self.prometheus_listen, key="supervisor.prometheus_listen", allow_zero=False)
        if not 0 < self.restart_backoff_initial_seconds <= self.restart_backoff_max_seconds:
            raise ConfigError("supervisor.restart_backoff_initial_seconds must be > 0 and <= the maximum")


SECTIONS: dict[str, type] = {
    "gateway": GatewaySettings,
    "compute": ComputeSettings,
    "relay": RelaySettings,
    "network": NetworkSettings,
    "snapshot": SnapshotSettings,
    "auth": AuthSettings,
    "supervisor": SupervisorSettings,
}
