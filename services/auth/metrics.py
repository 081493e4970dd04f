"""The auth service's Prometheus metrics: credential checks and the refusals among them by reason, and each tenant's
quota, used against its limit.

Quota usage is counted as it is enforced: sandboxes, vCPUs, memory and disk from the gateway's sandbox records (every
record is a sandbox; all but FAILED ones hold vCPUs, memory and disk, as placement counts them), snapshot bytes from
the usage auth keeps (`/microvm/auth/usage/<tenant>`), which the disk quota counts too. Read from etcd before each
scrape, for every tenant with a record: tenants are a bounded set an operator makes. Every auth replica reports the
same cluster-wide figures (`max by (tenant, resource)` in a query). A limit of 0 is no limit and is left out.
"""

from __future__ import annotations

from prometheus_client import Counter

from services.auth.quotas import FAILED
from services.common.errors import ServiceError
from services.common.metrics import ServiceMetrics
from services.common.records import QUOTA_USAGE, SANDBOXES, TENANTS, Records

# Each quota resource and the Quota field limiting it (memory reported in bytes, as Prometheus prefers).
LIMITS = {
    "sandboxes": "max_sandboxes",
    "vcpus": "max_vcpus",
    "memory_bytes": "max_memory_mib",
    "disk_bytes": "max_disk_bytes",
    "snapshot_bytes": "max_snapshot_bytes",
}


class CredentialMetrics:
    """`microvm_auth_verifications_total{kind}` and `microvm_auth_denials_total{kind, reason}`."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.verifications = Counter(
            "microvm_auth_verifications",
            "Credentials checked: kind api_key, token or scoped_token",
            ["kind"],
            registry=metrics.registry,
        )
        self.denials = Counter(
            "microvm_auth_denials",
            "Credentials refused, by kind and reason (BAD_CREDENTIAL, CREDENTIAL_EXPIRED, CREDENTIAL_REVOKED, ...)",
            ["kind", "reason"],
            registry=metrics.registry,
        )

    def watch(self, credentials) -> None:
        """Counts every check `credentials` makes from now on (Authenticate, ExchangeApiKey, CheckScopedToken)."""
        check_api_key, check_token = credentials.check_api_key, credentials.check_token

        async def api_key(credential):
            return await self._checked("api_key", check_api_key(credential))

        async def token(token, scopes=(), resource=""):
            return await self._checked("scoped_token" if scopes else "token", check_token(token, scopes, resource))

        credentials.check_api_key, credentials.check_token = api_key, token

    async def _checked(self, kind: str, check):
        self.verifications.labels(kind).inc()
        try:
            return await check
        except ServiceError as refused:
            self.denials.labels(kind, refused.reason).inc()
            raise


class QuotaMetrics:
    """`microvm_quota_used{tenant, resource}` and `microvm_quota_limit{tenant, resource}`."""

    def __init__(self, metrics: ServiceMetrics, etcd) -> None:
        self.records = Records(etcd)
        self.used: dict[tuple[str, str], int] = {}
        self.limits: dict[tuple[str, str], int] = {}
        metrics.gauge_callback(
            "microvm_quota_used",
            "What each tenant holds of a quota resource",
            ["tenant", "resource"],
            lambda: self.used,
        )
        metrics.gauge_callback(
            "microvm_quota_limit",
            "Each tenant's limit of a quota resource (absent: unlimited)",
            ["tenant", "resource"],
            lambda: self.limits,
        )
        metrics.before_scrape(self.refresh)

    async def refresh(self) -> None:
        tenants = {s.parts[0]: s.message.quota for s in await self.records.list(TENANTS)}
        held = {tenant: dict.fromkeys(LIMITS, 0) for tenant in tenants}
        for stored in await self.records.list(SANDBOXES):
            sandbox, totals = stored.message, held.get(stored.message.tenant)
            if totals is None:
                continue
            totals["sandboxes"] += 1
            if sandbox.state != FAILED:
                totals["vcpus"] += sandbox.vcpus
                totals["memory_bytes"] += sandbox.memory_mib << 20
                totals["disk_bytes"] += sandbox.disk_bytes
        for stored in await self.records.list(QUOTA_USAGE):
            if (totals := held.get(stored.parts[0])) is not None:
                totals["snapshot_bytes"] = stored.message.used.snapshot_bytes
                totals["disk_bytes"] += stored.message.used.snapshot_bytes
        self.used = {(tenant, resource): value for tenant, totals in held.items() for resource, value in totals.items()}
        self.limits = {
            (tenant, resource): limit << 20 if resource == "memory_bytes" else limit
            for tenant, quota in tenants.items()
            for resource, field in LIMITS.items()
            if (limit := getattr(quota, field))
        }
