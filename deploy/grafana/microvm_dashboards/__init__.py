"""The Grafana dashboards of deploy/grafana/dashboards/, as code: a module per dashboard, each a list of rows, each
row a list of panels, one call per panel (microvm_dashboards/panels.py). `build_dashboards.py` writes the JSON.

Metrics: services/common/metrics.py (gRPC, every service), services/compute/metrics.py (compute), recording rules in
deploy/prometheus/rules/microvm.rules.yml. Targets carry `job` (service kind), `service_instance`, `instance` (the
/metrics address, new at each start) and, on node services, `node`.
"""

from __future__ import annotations

import json

from .cluster import cluster
from .node import node
from .tenant import tenant

# File name under deploy/grafana/dashboards/ -> the function that builds it. A new dashboard: a module and a line here.
DASHBOARDS = {"microvm-cluster.json": cluster, "microvm-node.json": node, "microvm-tenant.json": tenant}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"
