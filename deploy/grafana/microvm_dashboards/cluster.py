"""The cluster overview: services up, calls, errors and latency per service kind, sandboxes and warm pools, creates
and VM start times, the data plane and etcd, network and snapshot stores, every node's allocation and disk, credential
checks and tenants' quotas."""

from __future__ import annotations

from .calls import calls_not_ok, etcd_panels, methods_table, streams_panel
from .panels import (
    ADDRESSES_FREE,
    ALLOCATED,
    DISK_FREE,
    ERROR_RATIO,
    UP_IS_GREEN,
    ZERO_IS_GREEN,
    bargauge,
    dashboard,
    datasource_variable,
    label_variable,
    query,
    stat,
    table,
    timeseries,
)

JOBS = 'job=~"$job"'
TEMPLATES = 'template=~"$template"'


def cluster() -> dict:
    return dashboard(
        "microvm-cluster",
        "MicroVM Sandbox / Cluster",
        "The whole installation: services up; calls, errors and latency per service kind; sandboxes and warm pools; "
        "creates and VM start times; exec streams, bytes streamed and etcd round trips; guest addresses, TAPs and "
        "snapshot stores; every node's allocation and disk; credential checks and every tenant's quota. Built by "
        "deploy/grafana/build_dashboards.py.",
        [
            datasource_variable(),
            label_variable("job", "Service", "up", every=True, description="Service kinds (gateway, auth, ...)"),
            label_variable("template", "Template", "microvm_vms", every=True, description="Templates with VMs"),
        ],
        [
            ("Services", cluster_services()),
            ("Calls, per service kind", cluster_calls()),
            ("Sandboxes", cluster_sandboxes()),
            ("Creates and VM starts", cluster_creates()),
            ("Data plane and etcd", cluster_data_plane()),
            ("Network and snapshots", cluster_network_and_snapshots()),
            ("Nodes", cluster_nodes()),
            ("Auth and tenants", cluster_auth_and_tenants()),
        ],
    )


def cluster_services() -> list[dict]:
    return [
        stat(
            "Instances up, by service",
            query(f"sum by (job) (up{{{JOBS}}})", "{{job}}"),
            description="Instances of each service kind whose /metrics answered the last scrape. A kind missing here "
            "has no instance registered at all: a dead process's target leaves discovery when its etcd lease expires "
            "(alert NodeLost covers compute).",
            width=12,
            thresholds=UP_IS_GREEN,
        ),
        stat(
            "Targets failing scrapes",
            query(f"count(up{{{JOBS}}} == 0) or vector(0)", "failing"),
            description="Registered instances whose /metrics does not answer (alert ServiceDown).",
            thresholds=ZERO_IS_GREEN,
        ),
        stat(
            "Compute nodes up",
            query('count(max by (node) (up{job="compute"}) == 1) or vector(0)', "nodes"),
            description="Nodes whose compute answers its scrapes.",
            thresholds=UP_IS_GREEN,
        ),
        stat(
            "Server-error ratio, all calls",
            query(
                f"sum(job:grpc_server_handled_server_errors:rate5m{{{JOBS}}})\n/\n"
                f"sum(job:grpc_server_handled:rate5m{{{JOBS}}})",
                "errors",
            ),
            description="Share of all calls in the last 5 minutes that ended in INTERNAL, UNKNOWN, UNAVAILABLE, "
            "DEADLINE_EXCEEDED or DATA_LOSS.",
            unit="percentunit",
            thresholds=ERROR_RATIO,
            decimals=2,
        ),
    ]


def cluster_calls() -> list[dict]:
    return [
        timeseries(
            "Calls per second",
            query(f"job:grpc_server_handled:rate5m{{{JOBS}}}", "{{job}}"),
            description="gRPC calls completed per second, over 5 minutes (recording rule "
            "job:grpc_server_handled:rate5m).",
            unit="reqps",
        ),
        timeseries(
            "Server-error ratio",
            query(f"job:grpc_server_handled_server_errors:ratio_rate5m{{{JOBS}}}", "{{job}}"),
            description="Share of calls ending in a server-side code, over 5 minutes. The line is HighErrorRatio's "
            "threshold (5% for 5 minutes).",
            unit="percentunit",
            threshold_line=ERROR_RATIO,
        ),
        timeseries(
            "p99 latency, unary calls",
            query(f"job:grpc_server_unary_handling_seconds:p99_rate5m{{{JOBS}}}", "{{job}}"),
            description="99th percentile of unary call durations over 5 minutes. Streams (exec, files) live as long "
            "as their command and are left out.",
            unit="s",
        ),
        calls_not_ok(JOBS, "job", "{{job}} {{grpc_code}}"),
        streams_panel(JOBS),
        methods_table(JOBS),
    ]


def cluster_sandboxes() -> list[dict]:
    sandboxes = f'state_template:microvm_vms:sum{{{TEMPLATES}, state!="pooled"}}'
    return [
        timeseries(
            "Sandboxes by state",
            query(f"sum by (state) ({sandboxes})", "{{state}}"),
            description="VMs of sandboxes on every node by state (creating, running, paused, stopped, failed); "
            "warm-pool VMs are not counted.",
            stacked=True,
        ),
        timeseries(
            "Sandboxes by template",
            query(f"sum by (template) ({sandboxes})", "{{template}}"),
            description="VMs of sandboxes on every node by template, in any state.",
            stacked=True,
        ),
        timeseries(
            "Warm pool depth, by template",
            query(f"template:microvm_warm_pool_vms:sum{{{TEMPLATES}}}", "{{template}}"),
            description="Paused VMs waiting in the warm pools of every node. An empty pool means creates of that "
            "template restore or boot instead of resuming (alert WarmPoolExhausted).",
        ),
    ]


def cluster_creates() -> list[dict]:
    """Creates as the gateway sees them (placement to RUNNING, restores and forks too), VM starts as compute does."""
    return [
        timeseries(
            "Creates per second, by result",
            query("sum by (result) (rate(microvm_sandbox_creates_total[$__rate_interval]))", "{{result}}"),
            description="Sandboxes created, restored or forked per second, by result: ok, or the status code the "
            "create ended with (resource_exhausted: no node or quota had room).",
            unit="reqps",
            width=6,
            stacked=True,
        ),
        timeseries(
            "Create time p90, by VM start method",
            query(
                "histogram_quantile(0.90, sum by (method, le) (rate(microvm_sandbox_create_seconds_bucket[10m])))",
                "{{method}}",
            ),
            description="90th percentile over 10 minutes of the time from placement to a RUNNING sandbox, as the "
            "gateway measures it, by how its VM started.",
            unit="s",
            width=6,
            log_scale=True,
        ),
        timeseries(
            "VM start p90, by method",
            query(
                "histogram_quantile(0.90, sum by (method, le) (rate(microvm_vm_start_seconds_bucket[10m])))",
                "{{method}}",
            ),
            description="90th percentile over 10 minutes of the time from a VM's admission to its agent answering, "
            "all nodes together, by start path (warm-pool, pool-fill, template-snapshot, cold-boot). SlowCreates "
            "fires per node above 1s (warm-pool) or 60s (cold-boot).",
            unit="s",
            log_scale=True,
            width=6,
        ),
        timeseries(
            "VM starts per minute, by method",
            query("sum by (method) (rate(microvm_vm_start_seconds_count[$__rate_interval])) * 60", "{{method}}"),
            description="VMs that started and answered, per minute, by start path.",
            width=6,
            stacked=True,
        ),
    ]


def cluster_data_plane() -> list[dict]:
    return [
        timeseries(
            "Exec streams open, by method",
            query("sum by (method) (microvm_exec_streams_open)", "{{method}}"),
            description="Exec, ExecInteractive and ConnectProcess streams the gateways hold open.",
            width=6,
            stacked=True,
        ),
        timeseries(
            "Bytes streamed per second, by kind",
            query(
                "sum by (direction, kind) (rate(microvm_stream_bytes_total[$__rate_interval]))",
                "{{direction}} {{kind}}",
            ),
            description="Bytes between clients and sandboxes through the gateways: stdout, stderr, stdin, files, "
            "archives, forwarded ports; to_client or to_sandbox.",
            unit="Bps",
            width=6,
        ),
        *etcd_panels(JOBS, width=6),
    ]


def cluster_network_and_snapshots() -> list[dict]:
    """Network metrics come only from nodes with networking on (services/network/metrics.py)."""
    return [
        bargauge(
            "Guest addresses free, per node",
            query(
                'sum by (node) (microvm_ip_addresses{state="free"})\n/\nsum by (node) (microvm_ip_addresses)',
                "{{node}}",
            ),
            description="Free share of each node's guest address pool (nodes with networking on): with none left, "
            "no sandbox with a network starts there.",
            thresholds=ADDRESSES_FREE,
            width=6,
        ),
        timeseries(
            "TAP devices, per node",
            query("sum by (node) (microvm_tap_devices)", "{{node}}"),
            description="Sandbox TAP devices on each host, as the host lists them: one leaked by a crash counts too.",
            width=6,
        ),
        timeseries(
            "Snapshot store on disk, per node",
            query('sum by (node) (microvm_snapshot_store_bytes{kind="stored"})', "{{node}}"),
            description="Bytes of snapshot chunks each node keeps on disk (identical chunks once).",
            unit="bytes",
            width=6,
        ),
        timeseries(
            "Snapshot dedup ratio, per node",
            query("max by (node) (microvm_snapshot_dedup_ratio)", "{{node}}"),
            description="Logical bytes of the snapshots a node holds over the bytes its store keeps: 3 means each "
            "stored byte serves three. Absent while a store is empty.",
            minimum=None,
            width=6,
        ),
    ]


def cluster_nodes() -> list[dict]:
    allocated = "instance_resource:microvm_node_allocated:ratio"
    disk_free = "instance:microvm_node_disk_free_bytes:ratio"
    return [
        bargauge(
            "Allocated share, per node",
            query(f"max by (node, resource) ({allocated})", "{{node}} {{resource}}"),
            description="Share of each node's vCPUs and memory its VMs hold (alert NodeNearlyFull at 90%).",
            thresholds=ALLOCATED,
        ),
        timeseries(
            "vCPUs: allocated and capacity",
            query('sum(microvm_node_allocated{resource="vcpus"})', "allocated"),
            query('sum(microvm_node_capacity{resource="vcpus"})', "capacity"),
            description="vCPUs held by VMs and offered, summed over every node.",
        ),
        timeseries(
            "Memory: allocated and capacity",
            query('sum(microvm_node_allocated{resource="memory_bytes"})', "allocated"),
            query('sum(microvm_node_capacity{resource="memory_bytes"})', "capacity"),
            description="Memory held by VMs and offered, summed over every node.",
            unit="bytes",
        ),
        table(
            "Nodes",
            [
                ("compute up", 'max by (node) (up{job="compute"})', "short"),
                ("vCPUs allocated", f'max by (node) ({allocated}{{resource="vcpus"}})', "percentunit"),
                ("memory allocated", f'max by (node) ({allocated}{{resource="memory_bytes"}})', "percentunit"),
                ("state disk free", f"min by (node) ({disk_free})", "percentunit"),
                ("sandboxes", 'sum by (node) (microvm_vms{state!="pooled"})', "short"),
                ("warm pool", "sum by (node) (microvm_warm_pool_vms)", "short"),
            ],
            description="Every compute node now; its name opens the node dashboard.",
            key="node",
            link="/d/microvm-node?var-node=${__value.raw}&${__url_time_range}&${datasource:queryparam}",
            width=16,
        ),
        bargauge(
            "State disk free, per node",
            query(f"min by (node) ({disk_free})", "{{node}}"),
            description="Free share of each node's state directory file system: VM disks, snapshot chunks, images "
            "(alert DiskNearlyFull under 10%).",
            thresholds=DISK_FREE,
        ),
    ]


def cluster_auth_and_tenants() -> list[dict]:
    """Credential checks and every tenant's quota (services/auth/metrics.py); each auth replica reports the same
    cluster-wide quota figures, hence max."""

    def share(resource: str) -> str:
        return (
            f'max by (tenant) (microvm_quota_used{{resource="{resource}"}})\n/\n'
            f'max by (tenant) (microvm_quota_limit{{resource="{resource}"}})'
        )

    return [
        timeseries(
            "Credential checks per second, by kind",
            query("sum by (kind) (rate(microvm_auth_verifications_total[$__rate_interval]))", "{{kind}}"),
            description="API keys, tokens and scoped tokens auth checked.",
            unit="reqps",
            width=6,
            stacked=True,
        ),
        timeseries(
            "Credentials refused per second, by reason",
            query(
                "sum by (kind, reason) (rate(microvm_auth_denials_total[$__rate_interval])) > 0",
                "{{kind}} {{reason}}",
            ),
            description="Credentials auth refused (BAD_CREDENTIAL, CREDENTIAL_EXPIRED, CREDENTIAL_REVOKED, ...): a "
            "burst of BAD_CREDENTIAL is someone guessing.",
            unit="reqps",
            width=6,
            stacked=True,
        ),
        table(
            "Tenants",
            [
                ("sandboxes", 'max by (tenant) (microvm_quota_used{resource="sandboxes"})', "short"),
                ("sandboxes quota", share("sandboxes"), "percentunit"),
                ("vCPUs quota", share("vcpus"), "percentunit"),
                ("memory quota", share("memory_bytes"), "percentunit"),
                ("disk quota", share("disk_bytes"), "percentunit"),
                ("snapshot quota", share("snapshot_bytes"), "percentunit"),
            ],
            description="Every tenant: its sandboxes and the share it holds of each limited quota (empty: no limit). "
            "Its name opens the tenant dashboard.",
            key="tenant",
            link="/d/microvm-tenant?var-tenant=${__value.raw}&${__url_time_range}&${datasource:queryparam}",
            width=12,
        ),
    ]
