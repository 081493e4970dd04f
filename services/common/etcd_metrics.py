"""etcd round trips of one service, timed into its Prometheus registry: `microvm_etcd_request_seconds{operation}`.

The timing sits on the service's etcd client, not in `Records`: a `Records` is made wherever a record is read (from
the bare client, dozens of places) and cannot reach the service's registry, and some calls bypass it (placement's
transaction, the relay's VM scan, the registration's lease). Each service has a client of its own (`serve` makes
it), so wrapping that one client's request methods once times every call the service makes, whoever makes it.
Watches are long-lived streams, not round trips: they are left out.
"""

from __future__ import annotations

import functools
import time

from prometheus_client import Histogram

from services.common.metrics import ServiceMetrics

# Seconds: a local etcd answers in well under a millisecond, a loaded or remote one in tens of milliseconds.
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The client's request methods (aetcd.Client) by the operation they are reported as.
OPERATIONS = {
    "get": "get",
    "get_prefix": "range",
    "get_range": "range",
    "get_all": "range",
    "put": "put",
    "delete": "delete",
    "delete_prefix": "delete",
    "delete_range": "delete",
    "transaction": "txn",
    "lease": "lease_grant",
    "refresh_lease": "lease_keepalive",
    "revoke_lease": "lease_revoke",
}


def time_etcd_requests(client, metrics: ServiceMetrics):
    """Times every request `client` makes from now on; returns the client."""
    seconds = Histogram(
        "microvm_etcd_request_seconds",
        "Round trip of this service's etcd requests, by operation",
        ["operation"],
        buckets=ETCD_BUCKETS,
        registry=metrics.registry,
    )
    for method, operation in OPERATIONS.items():
        if hasattr(client, method):
            setattr(client, method, _timed(getattr(client, method), seconds.labels(operation)))
    return client


def _timed(request, observed):
    @functools.wraps(request)
    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await request(*args, **kwargs)
        finally:
            observed.observe(time.perf_counter() - started)

    return timed
