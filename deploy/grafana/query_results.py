"""Every Grafana dashboard's panels with their queries' results, as Markdown: what the dashboards show, where
Grafana is not there to render them. Variables are filled as Grafana would (label values from the same
Prometheus, "All" as its regex, $__rate_interval as 1m), by the helpers the dashboard test uses.

    .venv/bin/python -m deploy.grafana.query_results --prometheus 127.0.0.1:9090 --out docs/observability-dashboards.md
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

from tests.grafana_dashboards import dashboards, panels, recording_rule_names, substitute
from tests.integration.test_grafana_dashboards import StackPrometheus, variable_values

MAX_SERIES = 8
NOT_RUN = "<!-- not run: a panel's queries and their results on the running installation's Prometheus -->"


def number(text: str) -> str:
    value = float(text)
    if math.isnan(value) or math.isinf(value):
        return text
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def rendered(result: list | dict, error: str) -> tuple[list[str], bool]:
    """(lines, has data) of an instant query's answer."""
    if error:
        return [f"  error: {error}"], False
    if not result:
        return ["  no data"], False
    lines = []
    for series in result[:MAX_SERIES]:
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()) if k != "__name__")
        lines.append(f"  {{{labels}}} → {number(series['value'][1])}")
    if len(result) > MAX_SERIES:
        lines.append(f"  … and {len(result) - MAX_SERIES} more series")
    return lines, True


def dashboard_section(name: str, dashboard: dict, prometheus: StackPrometheus, known: set[str]) -> tuple[str, int, int]:
    """(Markdown, panels with data, panels without) of one dashboard."""
    values, problems = variable_values(dashboard, prometheus, known)
    shown = ", ".join(f"`${key}` = `{value}`" for key, value in values.items())
    out = [f"## {dashboard['title']} (`{name}`)", "", f"Variables: {shown or 'none'}.", ""]
    out += [f"- variable problem: {problem}" for problem in problems]
    with_data = without = 0
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            out += [f"### Row: {substitute(panel.get('title', ''), values)}", ""]
            continue
        if not panel.get("targets"):
            continue
        block, any_data = [], False
        for target in panel["targets"]:
            try:
                expr = substitute(target["expr"], values)
                result, error = prometheus.query(expr)
            except KeyError as missing:
                expr, result, error = target["expr"], [], str(missing)
            lines, data = rendered(result, error)
            any_data |= data
            block += [f"{target.get('refId', '?')}: {' '.join(expr.split())}", *lines]
        with_data += any_data
        without += not any_data
        mark = "" if any_data else " (no data)"
        out += [f"#### {panel.get('title')} ({panel.get('type')}){mark}", "", NOT_RUN, "```text", *block, "```", ""]
    return "\n".join(out), with_data, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="127.0.0.1:9090", help="host:port of Prometheus")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    args = parser.parse_args()
    prometheus = StackPrometheus(args.prometheus)
    known = prometheus.known_metrics() | recording_rule_names()
    sections, counts = [], []
    for name, dashboard in dashboards().items():
        text, with_data, without = dashboard_section(name, dashboard, prometheus, known)
        sections.append(text)
        counts.append(f"{dashboard['title']}: {with_data} panels with data, {without} without")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    intro = [
        "# Dashboards: their panels' query results",
        "",
        "In place of screenshots (Grafana is not installed here), each panel of the dashboards in",
        "[deploy/grafana/dashboards](../deploy/grafana/dashboards) with its queries, the dashboard's variables filled",
        f"as Grafana would, and each query's instant result (at most {MAX_SERIES} series, labels → value, rounded)",
        f"from the Prometheus of the running installation (`make up`, {args.prometheus}), generated {now} after a",
        "few sandboxes were created and ran commands (one still running while this was written, all deleted",
        "after). Regenerate with:",
        "",
        "<!-- not run: needs the running installation (make up) and rewrites this file -->",
        "```sh",
        f".venv/bin/python -m deploy.grafana.query_results --prometheus {args.prometheus} --out {args.out}",
        "```",
        "",
        *[f"- {line}" for line in counts],
        "",
    ]
    args.out.write_text("\n".join(intro) + "\n" + "\n\n".join(sections).rstrip() + "\n")
    print("\n".join(counts))


if __name__ == "__main__":
    main()
