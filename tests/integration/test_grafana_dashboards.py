"""Every query of every Grafana dashboard (deploy/grafana/dashboards) runs on the test stack's own Prometheus: no
query error, and no metric Prometheus does not know (a misspelt name is no error to Prometheus, only an empty panel).
Template variables get what Grafana would give them: label values read from the same Prometheus, "All" as its
regex, $__rate_interval and friends as for a one-hour range."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from services.supervisor.stack import SERVICE_KINDS
from tests.grafana_dashboards import (
    REPO,
    dashboards,
    label_values_query,
    metric_names,
    recording_rule_names,
    substitute,
    targets,
    variable_query,
    variables,
)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (make apt installs it)"
)

# Suffixes of the series a histogram or summary family stands for.
FAMILY_SERIES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
# Metrics the test stack cannot know, each with why: it runs with `networking: false` (tests/stack.py). They are
# taken as known here, and test_metrics_the_test_stack_lacks_are_still_declared_by_a_service keeps the list honest.
NOT_ON_THE_TEST_STACK = {
    "microvm_ip_addresses": "network declares it only on a node with networking on",
    "microvm_tap_devices": "network declares it only on a node with networking on",
}


class StackPrometheus:
    def __init__(self, address: str) -> None:
        self.base = f"http://{address}/api/v1/"

    def get(self, path: str, **params) -> dict:
        """Prometheus's JSON answer, an error answer (HTTP 400, 422) included."""
        url = self.base + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            try:
                return json.loads(error.read())
            except ValueError:
                return {"status": "error", "errorType": f"HTTP {error.code}", "error": error.reason}

    def query(self, expr: str) -> tuple[list, str]:
        """(result, error) of an instant query."""
        answer = self.get("query", query=expr)
        if answer.get("status") != "success":
            return [], f"{answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]["result"], ""

    def label_values(self, label: str, selector: str) -> tuple[list[str], str]:
        answer = self.get(f"label/{label}/values", **({"match[]": selector} if selector else {}))
        if answer.get("status") != "success":
            return [], f"{answer.get('errorType')}: {answer.get('error')}"
        return sorted(answer["data"]), ""

    def known_metrics(self) -> set[str]:
        """Names of the series Prometheus holds, and of those every scraped family declares even before its first
        sample (a histogram nobody observed yet: its _bucket, _sum, _count)."""
        names = set(self.get("label/__name__/values")["data"])
        for family, entries in self.get("metadata")["data"].items():
            for entry in entries:
                names |= {family + suffix for suffix in FAMILY_SERIES.get(entry["type"], ("",))}
        return names


@pytest.fixture(scope="module")
def prometheus(stack) -> StackPrometheus:
    """The stack's Prometheus once it has scraped every service and its recording rules have data."""
    prometheus = StackPrometheus(stack.prometheus_address)
    deadline, up = time.monotonic() + 90, set()
    while time.monotonic() < deadline:
        try:
            result, _ = prometheus.query("up == 1")
            up = {series["metric"].get("job") for series in result}
            rules, _ = prometheus.query("job:grpc_server_handled:rate5m")
            if up >= set(SERVICE_KINDS) and rules:
                break
        except OSError:
            pass
        time.sleep(0.5)
    assert up >= set(SERVICE_KINDS), f"Prometheus scrapes only {sorted(up)}"
    return prometheus


def variable_values(dashboard: dict, prometheus: StackPrometheus, known: set[str]) -> tuple[dict, list[str]]:
    """({variable: the value Grafana would use}, problems): a multi-value variable set to "All" (its allValue), any
    other its first value on the stack. Variable queries are checked like panel queries."""
    values, problems = {}, []
    for variable in variables(dashboard):
        name, kind = variable["name"], variable["type"]
        where = f"variable ${name}"
        if kind == "datasource":
            values[name] = variable.get("query", "prometheus")
        elif kind == "query":
            try:
                selector, label = label_values_query(substitute(variable_query(variable), values))
            except (KeyError, ValueError) as error:
                problems.append(f"{where}: {error}")
                continue
            if unknown := metric_names(selector) - known:
                problems.append(f"{where}: unknown metrics {sorted(unknown)} in {selector}")
            options, error = prometheus.label_values(label, selector)
            if error:
                problems.append(f"{where}: {error}")
            elif variable.get("includeAll"):
                values[name] = variable.get("allValue") or "|".join(re.escape(option) for option in options)
            elif options:
                values[name] = options[0]
            else:
                problems.append(f"{where}: label_values({selector}, {label}) has no value on the test stack")
        elif kind == "custom":
            values[name] = variable["query"].split(",")[0].strip()
        elif kind in ("constant", "textbox"):
            values[name] = variable["query"]
        else:
            problems.append(f"{where}: type {kind} is not one this test knows how to fill in")
    return values, problems


def dashboard_problems(dashboard: dict, prometheus: StackPrometheus, known: set[str]) -> list[str]:
    values, problems = variable_values(dashboard, prometheus, known)
    for panel, target in targets(dashboard):
        where = f"panel {panel.get('title')!r} query {target.get('refId')}"
        try:
            expr = substitute(target["expr"], values)
        except KeyError as error:
            problems.append(f"{where}: {error}")
            continue
        _, error = prometheus.query(expr)
        if error:
            problems.append(f"{where}: {error}\n    {expr}")
        if unknown := metric_names(expr) - known:
            problems.append(f"{where}: unknown metrics {sorted(unknown)}\n    {expr}")
    return problems


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_panel_query_runs_on_the_stacks_prometheus_and_reads_only_metrics_it_knows(prometheus, name):
    dashboard = dashboards()[name]
    known = prometheus.known_metrics() | recording_rule_names() | set(NOT_ON_THE_TEST_STACK)
    assert list(targets(dashboard)), f"{name} has no queries"
    problems = dashboard_problems(dashboard, prometheus, known)
    assert not problems, "\n".join(problems)


def test_metrics_the_test_stack_lacks_are_still_declared_by_a_service():
    sources = "\n".join(path.read_text() for path in (REPO / "services").rglob("*.py"))
    assert [name for name in NOT_ON_THE_TEST_STACK if f'"{name}"' not in sources] == []


def test_the_check_reports_a_broken_query_a_misspelt_metric_and_an_unknown_variable(prometheus):
    def panel(title, expr):
        return {"title": title, "targets": [{"refId": "A", "expr": expr}]}

    dashboard = {
        "templating": {"list": [{"name": "node", "type": "query", "query": "label_values(up, node)"}]},
        "panels": [
            panel("fine", 'sum by (job) (rate(grpc_server_handled_total{node="$node"}[$__rate_interval]))'),
            panel("broken", "sum by (job) (rate(grpc_server_handled_total[5m])"),
            panel("misspelt", "sum(rate(grpc_server_handled_totals[$__rate_interval]))"),
            panel("unknown variable", 'up{node="$nodes"}'),
        ],
    }
    known = prometheus.known_metrics() | recording_rule_names()
    problems = dashboard_problems(dashboard, prometheus, known)
    assert [problem.split(":")[0] for problem in problems] == [
        "panel 'broken' query A",
        "panel 'misspelt' query A",
        "panel 'unknown variable' query A",
    ]
    assert "parse error" in problems[0]
    assert "grpc_server_handled_totals" in problems[1]
    assert "$nodes" in problems[2]
