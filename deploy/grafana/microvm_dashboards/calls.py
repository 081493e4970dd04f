"""Panels about gRPC calls and etcd round trips that the cluster and the node dashboards share, given a label
selector."""

from __future__ import annotations

from .panels import SERVER_ERROR_CODES, query, table, timeseries


def server_error_ratio(selector: str, by: str) -> str:
    """Share of calls ending in a server-side code, per `by`; 0 for a group that served calls without failing one,
    nothing for a group that served none (as the recording rule job:grpc_server_handled_server_errors:ratio_rate5m)."""
    errors = f'rate(grpc_server_handled_total{{{selector}, grpc_code=~"{SERVER_ERROR_CODES}"}}[$__rate_interval])'
    calls = f"sum by ({by}) (rate(grpc_server_handled_total{{{selector}}}[$__rate_interval]))"
    return f"(sum by ({by}) ({errors}) or 0 * {calls})\n/\n({calls} > 0)"


def streams_open(selector: str) -> str:
    """Streams started and not yet ended, per method: started minus handled (both reset together at a restart)."""
    started = f'sum by (job, grpc_method) (grpc_server_started_total{{{selector}, grpc_type!="unary"}})'
    handled = f'sum by (job, grpc_method) (grpc_server_handled_total{{{selector}, grpc_type!="unary"}})'
    return f"{started}\n-\n({handled} or 0 * {started})"


def calls_not_ok(selector: str, by: str, legend: str, width: int = 12) -> dict:
    return timeseries(
        "Calls not OK, by code",
        query(
            f'sum by ({by}, grpc_code) (rate(grpc_server_handled_total{{{selector}, grpc_code!="OK"}}'
            f"[$__rate_interval])) > 0",
            legend,
        ),
        description="Calls per second that ended in a status other than OK, by the code the caller got. Codes a "
        "caller earns (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED from a quota) are here too; "
        "the error ratio counts only the server's own (INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS).",
        unit="reqps",
        width=width,
        stacked=True,
    )


def streams_panel(selector: str) -> dict:
    return timeseries(
        "Streams open, by method",
        query(streams_open(selector), "{{job}} {{grpc_method}}"),
        description="Server, client and bidi streams started and not yet ended: exec and file streams, watches, "
        "forwarded data-plane calls.",
        width=12,
    )


def methods_table(selector: str) -> dict:
    window = "[$__range]"
    return table(
        "Methods over the time range",
        [
            ("calls/s", f"sum by (job, grpc_method) (rate(grpc_server_handled_total{{{selector}}}{window}))", "reqps"),
            (
                "server errors/s",
                f"sum by (job, grpc_method) (rate(grpc_server_handled_total{{{selector}, "
                f'grpc_code=~"{SERVER_ERROR_CODES}"}}{window}))',
                "reqps",
            ),
            (
                "p99 (unary)",
                f"histogram_quantile(0.99, sum by (job, grpc_method, le) "
                f'(rate(grpc_server_handling_seconds_bucket{{{selector}, grpc_type="unary"}}{window})))',
                "s",
            ),
        ],
        description="Every gRPC method that served calls in the time range: its rate, the rate of server-side "
        "failures and, for unary methods, its p99 latency. Sort by a column to find the busiest, failing or slowest.",
        key="job, grpc_method",
        height=10,
    )


def etcd_panels(selector: str, width: int = 12) -> list[dict]:
    """etcd round trips of every service (services/common/etcd_metrics.py); watches are not timed."""
    requests = f"microvm_etcd_request_seconds_bucket{{{selector}}}"
    return [
        timeseries(
            "etcd round trip p99, by service",
            query(f"histogram_quantile(0.99, sum by (job, le) (rate({requests}[$__rate_interval])))", "{{job}}"),
            description="99th percentile of the services' etcd requests (get, range, put, delete, txn, lease), as "
            "each service times them on its own client. Placement is one txn: a slow etcd is a slow create.",
            unit="s",
            width=width,
        ),
        timeseries(
            "etcd requests per second, by operation",
            query(
                f"sum by (operation) (rate(microvm_etcd_request_seconds_count{{{selector}}}[$__rate_interval]))",
                "{{operation}}",
            ),
            description="etcd round trips the services make, by operation (lease_keepalive: the registrations).",
            unit="reqps",
            width=width,
            stacked=True,
        ),
    ]
