"""The Grafana dashboards of deploy/grafana: what build_dashboards.py writes, well-formed for Grafana (unique panel
ids, panels on the grid without overlap, every query with an expression and a refId, every data source the
`datasource` variable, every variable a query uses defined), and provisioned by files a stock Grafana reads. Their
queries run against a real Prometheus in tests/integration/test_grafana_dashboards.py."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import combinations

import pytest
import yaml

from tests.grafana_dashboards import (
    GRAFANA_DIR,
    dashboards,
    label_values_query,
    metric_names,
    panels,
    substitute,
    targets,
    variable_query,
    variables,
)

DASHBOARDS = dashboards()
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboards_are_what_build_dashboards_writes():
    script = GRAFANA_DIR / "build_dashboards.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(GRAFANA_DIR))
    try:
        from microvm_dashboards import DASHBOARDS as BUILT
    finally:
        sys.path.remove(str(GRAFANA_DIR))
    assert sorted(BUILT) == sorted(DASHBOARDS), "every dashboard JSON is built by build_dashboards.py"


def test_the_cluster_node_and_tenant_dashboards_exist_with_distinct_uids():
    uids = [dashboard["uid"] for dashboard in DASHBOARDS.values()]
    assert {"microvm-cluster", "microvm-node", "microvm-tenant"} <= set(uids)
    assert len(uids) == len(set(uids))


@pytest.fixture(params=sorted(DASHBOARDS))
def dashboard(request) -> dict:
    return DASHBOARDS[request.param]


def test_dashboard_has_a_title_a_recent_schema_and_the_microvm_tag(dashboard):
    assert dashboard["title"] and dashboard["description"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "microvm" in dashboard["tags"]


def test_panel_ids_are_unique(dashboard):
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(panel_id, int) for panel_id in ids)


def test_panels_lie_on_the_grid_without_overlapping(dashboard):
    boxes = []
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
    for (first, a), (second, b) in combinations(boxes, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{first!r} overlaps {second!r}"


def test_every_panel_but_a_row_has_queries_a_title_and_a_description(dashboard):
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert panel["title"]
            continue
        assert panel["title"] and panel.get("description"), panel
        assert panel.get("targets"), panel["title"]


def test_every_target_has_an_expression_and_a_refid_unique_in_its_panel(dashboard):
    for panel in panels(dashboard):
        ref_ids = [target.get("refId") for target in panel.get("targets", [])]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel.get("targets", []):
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), (panel["title"], target)


def test_every_data_source_is_the_datasource_variable(dashboard):
    datasource = [v for v in variables(dashboard) if v["name"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["type"] == "datasource"
    assert datasource[0]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel.get("targets"):
            assert panel.get("datasource") == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource", DATASOURCE) == DATASOURCE, (panel["title"], target["refId"])
    for variable in variables(dashboard):
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_every_variable_in_a_query_is_defined_and_multi_values_match_as_a_regex(dashboard):
    names = {variable["name"]: variable for variable in variables(dashboard)}
    dummies = dict.fromkeys(names, "x")
    for _panel, target in targets(dashboard):
        substitute(target["expr"], dummies)  # KeyError names an undefined one
    for variable in variables(dashboard):
        if variable["type"] == "query":
            label_values_query(substitute(variable_query(variable), dummies))
        if variable.get("includeAll"):
            # "All" as `.*` rather than Grafana's alternation of every value (which can outgrow a URL)
            assert variable.get("allValue") == ".*", variable["name"]
    # A multi-value variable matches only with =~ (Grafana writes a regex of the chosen values).
    for panel, target in targets(dashboard):
        for name, variable in names.items():
            if variable.get("multi"):
                for match in re.finditer(rf'(\w+)\s*(=~|!~|=|!=)\s*"[^"]*\${name}\b', target["expr"]):
                    assert match.group(2) in ("=~", "!~"), (panel["title"], match.group(0))


def test_table_links_open_a_dashboard_that_exists(dashboard):
    uids = {other["uid"] for other in DASHBOARDS.values()}
    for panel in panels(dashboard):
        for override in panel.get("fieldConfig", {}).get("overrides", []):
            for prop in override["properties"]:
                for link in prop["value"] if prop["id"] == "links" else []:
                    uid = re.match(r"/d/([\w-]+)", link["url"]).group(1)
                    assert uid in uids, (panel["title"], link["url"])


def test_provisioning_gives_grafana_a_prometheus_and_the_dashboards():
    sources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "microvm.yaml").read_text())
    assert sources["apiVersion"] == 1
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    assert source["jsonData"]["timeInterval"] == "5s"  # the scrape interval of services/supervisor/prometheus.py
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "microvm.yaml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job) (rate(grpc_server_handled_total{job=~"a|b"}[5m]))', {"grpc_server_handled_total"}),
        ("job:grpc_server_handled:rate5m / ignoring (code) up offset 5m", {"job:grpc_server_handled:rate5m", "up"}),
        (
            'histogram_quantile(0.99, sum(rate(x_bucket{le!="+Inf"}[1m:15s])) by (le)) > 1e-3',
            {"x_bucket"},
        ),
        ('count(up == 0) or vector(0) and on (node) group_left (job) m{a="sum(b)"}', {"up", "m"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") unless max without (a) (avg_over_time(y[1h]))', {"up", "y"}),
        ("topk(3, sum by (job, le) (z)) - Inf + NaN", {"z"}),
    ],
)
def test_metric_names_finds_the_metrics_an_expression_reads_and_nothing_else(expr, names):
    assert metric_names(expr) == names
