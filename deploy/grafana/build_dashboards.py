"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from their code in microvm_dashboards/.

The JSON files are what Grafana loads (deploy/grafana/provisioning); microvm_dashboards/ is where they are edited.
A panel is one call in a row's list (`timeseries`, `stat`, `bargauge`, `heatmap`, `table`): its title, queries and
unit. Ids, refIds and the grid are worked out, so adding, moving or dropping a panel touches one place. Then:

    .venv/bin/python deploy/grafana/build_dashboards.py          # rewrite dashboards/*.json
    .venv/bin/python deploy/grafana/build_dashboards.py --check  # exit 1 when they are not in step

tests/unit/test_grafana_dashboards_json.py fails when the JSON and the code disagree, and
tests/integration/test_grafana_dashboards.py runs every query against the test stack's Prometheus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from microvm_dashboards import DASHBOARDS, render

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a dashboard file is not what this builds")
    arguments = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = DASHBOARD_DIR / name, render(build)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not arguments.check:
            DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if arguments.check and stale:
        print(f"out of step with {Path(__file__).name}: {', '.join(stale)} (run it without --check)", file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote {DASHBOARD_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
