"""One tenant (variable `tenant`): what it holds of each quota resource against its limit (services/auth/metrics.py).
Tenants are a bounded set an operator makes, so `tenant` is a label there; a sandbox id never is."""

from __future__ import annotations

from .panels import QUOTA_HELD, bargauge, dashboard, datasource_variable, label_variable, query, timeseries

TENANT = 'tenant="$tenant"'
# Quota resources as auth reports them (services/auth/metrics.py LIMITS): (label value, title, unit).
RESOURCES = [
    ("sandboxes", "Sandboxes", "short"),
    ("vcpus", "vCPUs", "short"),
    ("memory_bytes", "Memory", "bytes"),
    ("disk_bytes", "Disk (sandbox disks and snapshots)", "bytes"),
    ("snapshot_bytes", "Snapshots", "bytes"),
]


def tenant() -> dict:
    return dashboard(
        "microvm-tenant",
        "MicroVM Sandbox / Tenant",
        "One tenant: what it holds of each quota resource (sandboxes, vCPUs, memory, disk, snapshot bytes) and its "
        "limit, as placement and auth count them. Built by deploy/grafana/build_dashboards.py.",
        [
            datasource_variable(),
            label_variable("tenant", "Tenant", "microvm_quota_used", every=False, description="Tenants with a record"),
        ],
        [("Quota of $tenant", [quota_held(), *[held_and_limit(*resource) for resource in RESOURCES]])],
    )


def quota_held() -> dict:
    # Every auth replica reports the same cluster-wide figures: max, not sum.
    return bargauge(
        "Share of each quota held",
        query(
            f"max by (resource) (microvm_quota_used{{{TENANT}}})\n/\n"
            f"max by (resource) (microvm_quota_limit{{{TENANT}}})",
            "{{resource}}",
        ),
        description="What the tenant holds of each limited resource; a resource without a limit is not shown. At "
        "100% a create that needs more is refused with RESOURCE_EXHAUSTED.",
        thresholds=QUOTA_HELD,
    )


def held_and_limit(resource: str, title: str, unit: str) -> dict:
    selector = f'{TENANT}, resource="{resource}"'
    return timeseries(
        title,
        query(f"max(microvm_quota_used{{{selector}}})", "held"),
        query(f"max(microvm_quota_limit{{{selector}}})", "limit"),
        description=f"What the tenant holds of its `{resource}` quota, and the limit (none drawn: unlimited).",
        unit=unit,
    )
