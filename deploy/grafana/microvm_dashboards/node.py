"""One node (variable `node`): its VMs and warm pool, capacity and disk, VM start times, and its services' calls."""

from __future__ import annotations

from .calls import calls_not_ok, etcd_panels, methods_table, server_error_ratio, streams_panel
from .panels import (
    ALLOCATED,
    DISK_FREE,
    ERROR_RATIO,
    UP_IS_GREEN,
    bargauge,
    dashboard,
    datasource_variable,
    heatmap,
    label_variable,
    query,
    stat,
    timeseries,
)

HERE = 'node="$node"'
VMS_HERE = f'{HERE}, template=~"$template"'


def node() -> dict:
    return dashboard(
        "microvm-node",
        "MicroVM Sandbox / Node",
        "One node: its VMs and warm pool, what its VMs hold of its vCPUs, memory and disk, how long its VMs take to "
        "start, its guest addresses, TAPs and snapshot store, and calls, errors, latency and etcd round trips of its "
        "services (compute, relay, network, snapshot). "
        "Built by deploy/grafana/build_dashboards.py.",
        [
            datasource_variable(),
            label_variable("node", "Node", "microvm_node_capacity", every=False, description="Nodes running compute"),
            label_variable(
                "template", "Template", f"microvm_vms{{{HERE}}}", every=True, description="Templates with VMs here"
            ),
        ],
        [
            ("Node", node_summary()),
            ("VMs", node_vms()),
            ("Capacity", node_capacity()),
            ("VM starts", node_starts()),
            ("Network and snapshots", node_network_and_snapshots()),
            ("Services on this node", node_services()),
        ],
    )


def node_summary() -> list[dict]:
    return [
        stat(
            "Services up",
            query(f"max by (job) (up{{{HERE}}})", "{{job}}"),
            description="This node's services whose /metrics answered the last scrape.",
            width=8,
            thresholds=UP_IS_GREEN,
        ),
        stat(
            "Sandboxes",
            query(f'sum(microvm_vms{{{VMS_HERE}, state!="pooled"}}) or vector(0)', "sandboxes"),
            description="VMs of sandboxes on this node, in any state.",
        ),
        stat(
            "Warm pool",
            query(f"sum(microvm_warm_pool_vms{{{VMS_HERE}}}) or vector(0)", "pooled"),
            description="Paused VMs waiting in this node's warm pools.",
        ),
        bargauge(
            "Allocated",
            query(f"max by (resource) (instance_resource:microvm_node_allocated:ratio{{{HERE}}})", "{{resource}}"),
            description="Share of this node's vCPUs and memory its VMs hold (alert NodeNearlyFull at 90%).",
            thresholds=ALLOCATED,
            width=4,
            height=4,
        ),
        stat(
            "State disk free",
            query(f"min(instance:microvm_node_disk_free_bytes:ratio{{{HERE}}})", "free"),
            description="Free share of the state directory's file system (alert DiskNearlyFull under 10%).",
            unit="percentunit",
            thresholds=DISK_FREE,
            decimals=1,
        ),
    ]


def node_vms() -> list[dict]:
    return [
        timeseries(
            "VMs by state",
            query(f"sum by (state) (microvm_vms{{{VMS_HERE}}})", "{{state}}"),
            description="This node's VMs by state; `pooled` are warm-pool VMs.",
            stacked=True,
        ),
        timeseries(
            "Sandboxes by template",
            query(f'sum by (template) (microvm_vms{{{VMS_HERE}, state!="pooled"}})', "{{template}}"),
            description="VMs of sandboxes on this node by template, in any state.",
            stacked=True,
        ),
        timeseries(
            "Warm pool depth, by template",
            query(f"sum by (template) (microvm_warm_pool_vms{{{VMS_HERE}}})", "{{template}}"),
            description="Paused VMs waiting in this node's pool of each template (alert WarmPoolExhausted when one "
            "stays empty).",
        ),
    ]


def node_capacity() -> list[dict]:
    return [
        timeseries(
            "vCPUs",
            query(f'max(microvm_node_allocated{{{HERE}, resource="vcpus"}})', "allocated"),
            query(f'max(microvm_node_capacity{{{HERE}, resource="vcpus"}})', "capacity"),
            description="vCPUs this node's VMs hold and the vCPUs it offers.",
        ),
        timeseries(
            "Memory",
            query(f'max(microvm_node_allocated{{{HERE}, resource="memory_bytes"}})', "allocated"),
            query(f'max(microvm_node_capacity{{{HERE}, resource="memory_bytes"}})', "capacity"),
            description="Memory this node's VMs hold and the memory it offers.",
            unit="bytes",
        ),
        timeseries(
            "State disk",
            query(
                f'max(microvm_node_disk_bytes{{{HERE}, kind="total"}})\n-\n'
                f'max(microvm_node_disk_bytes{{{HERE}, kind="free"}})',
                "used",
            ),
            query(f'max(microvm_node_disk_bytes{{{HERE}, kind="total"}})', "total"),
            description="The file system of the state directory (VM disks, snapshot chunks, images): used and total.",
            unit="bytes",
        ),
    ]


def node_starts() -> list[dict]:
    buckets = f"microvm_vm_start_seconds_bucket{{{HERE}}}"
    return [
        timeseries(
            "Start time p50 and p90, by method",
            query(f"node_method:microvm_vm_start_seconds:p90_rate10m{{{HERE}}}", "p90 {{method}}"),
            query(f"histogram_quantile(0.50, sum by (method, le) (rate({buckets}[10m])))", "p50 {{method}}"),
            description="Time from a VM's admission to its agent answering over 10 minutes, by start path. "
            "SlowCreates fires when p90 stays above 1s (warm-pool) or 60s (cold-boot).",
            unit="s",
            log_scale=True,
        ),
        heatmap(
            "Start times",
            query(f"sum by (le) (increase({buckets}[$__rate_interval]))", "{{le}}", heatmap=True),
            description="How many VMs started within each bucket of time, every start path together.",
        ),
        stat(
            "Starts in the time range, by method",
            query(
                f"sum by (method) (increase(microvm_vm_start_seconds_count{{{HERE}}}[$__range]))",
                "{{method}}",
                instant=True,
            ),
            description="VMs that started and answered on this node in the dashboard's time range.",
            width=8,
            height=8,
            decimals=0,
        ),
    ]


def node_network_and_snapshots() -> list[dict]:
    """Network metrics come only from a node with networking on (services/network/metrics.py)."""
    return [
        timeseries(
            "Guest addresses",
            query(f"sum by (state) (microvm_ip_addresses{{{HERE}}})", "{{state}}"),
            description="This node's guest address pool, used and free: with none free, no sandbox with a network "
            "starts here.",
            width=6,
            stacked=True,
        ),
        timeseries(
            "TAP devices",
            query(f"sum(microvm_tap_devices{{{HERE}}})", "TAP devices"),
            description="Sandbox TAP devices on this host, as the host lists them: one leaked by a crash counts too.",
            width=6,
        ),
        timeseries(
            "Snapshot store",
            query(f"max by (kind) (microvm_snapshot_store_bytes{{{HERE}}})", "{{kind}}"),
            description="stored: bytes of chunks on this node's disk (identical chunks once); logical: what the "
            "snapshots this node holds add up to.",
            unit="bytes",
            width=6,
        ),
        timeseries(
            "Snapshot dedup ratio",
            query(f"max(microvm_snapshot_dedup_ratio{{{HERE}}})", "logical / stored"),
            description="Logical bytes of the snapshots this node holds over the bytes its store keeps. Absent while "
            "the store is empty.",
            minimum=None,
            width=6,
        ),
    ]


def node_services() -> list[dict]:
    unary = f'grpc_server_handling_seconds_bucket{{{HERE}, grpc_type="unary"}}'
    return [
        timeseries(
            "Calls per second, by service",
            query(f"sum by (job) (rate(grpc_server_handled_total{{{HERE}}}[$__rate_interval]))", "{{job}}"),
            description="gRPC calls this node's services completed per second.",
            unit="reqps",
        ),
        timeseries(
            "Server-error ratio, by service",
            query(server_error_ratio(HERE, "job"), "{{job}}"),
            description="Share of calls ending in INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED or DATA_LOSS. "
            "The line is HighErrorRatio's threshold (5%).",
            unit="percentunit",
            threshold_line=ERROR_RATIO,
        ),
        timeseries(
            "p99 latency, unary calls, by service",
            query(f"histogram_quantile(0.99, sum by (job, le) (rate({unary}[$__rate_interval])))", "{{job}}"),
            description="99th percentile of unary call durations; streams are left out.",
            unit="s",
        ),
        calls_not_ok(HERE, "job, grpc_method", "{{job}} {{grpc_method}} {{grpc_code}}"),
        streams_panel(HERE),
        *etcd_panels(HERE),
        methods_table(HERE),
    ]
