"""Building blocks of a dashboard: queries, panels (timeseries, stat, bargauge, heatmap, table), variables, and the
dashboard that lays its rows of panels out on Grafana's grid. Each returns Grafana's JSON model (schemaVersion 39) as
a dict; ids, refIds and grid positions are worked out here, never written by hand."""

from __future__ import annotations

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
TAG = "microvm"
# The codes the recording rules count as the server's fault (deploy/prometheus/rules/microvm.rules.yml).
SERVER_ERROR_CODES = "INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"
GRID_WIDTH = 24

# Thresholds: (color, lower bound), the first bound None.
UP_IS_GREEN = [("red", None), ("green", 1)]
ZERO_IS_GREEN = [("green", None), ("red", 1)]
ERROR_RATIO = [("green", None), ("red", 0.05)]  # HighErrorRatio fires above 5%
ALLOCATED = [("green", None), ("orange", 0.75), ("red", 0.9)]  # NodeNearlyFull fires above 90%
DISK_FREE = [("red", None), ("orange", 0.1), ("green", 0.2)]  # DiskNearlyFull fires under 10%
ADDRESSES_FREE = [("red", None), ("orange", 0.1), ("green", 0.2)]
QUOTA_HELD = [("green", None), ("orange", 0.75), ("red", 0.9)]


def query(expr: str, legend: str = "", instant: bool = False, table: bool = False, heatmap: bool = False) -> dict:
    """One Prometheus query of a panel (its refId is given by the panel)."""
    target = {"datasource": DATASOURCE, "editorMode": "code", "expr": expr, "legendFormat": legend or "__auto"}
    target["range"], target["instant"] = not (instant or table), instant or table
    if table:
        target["format"] = "table"
    elif heatmap:
        target["format"] = "heatmap"
    return target


def _panel(kind: str, title: str, queries, description: str, width: int, height: int, defaults: dict, options: dict):
    targets = [dict(target, refId=chr(ord("A") + index)) for index, target in enumerate(queries)]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def _thresholds(steps) -> dict:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def timeseries(
    title: str,
    *queries: dict,
    description: str,
    unit: str = "short",
    width: int = 8,
    height: int = 8,
    stacked: bool = False,
    log_scale: bool = False,
    threshold_line: list | None = None,
    minimum: float | None = 0,
) -> dict:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 30 if stacked else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        "scaleDistribution": {"type": "log", "log": 10} if log_scale else {"type": "linear"},
        "thresholdsStyle": {"mode": "line" if threshold_line else "off"},
    }
    defaults = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": _thresholds(threshold_line or [("green", None)]),
    }
    if minimum is not None and not log_scale:
        defaults["min"] = minimum
    options = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return _panel("timeseries", title, queries, description, width, height, defaults, options)


def _reduce(calc: str = "lastNotNull") -> dict:
    return {"calcs": [calc], "fields": "", "values": False}


def stat(
    title: str,
    *queries: dict,
    description: str,
    unit: str = "short",
    width: int = 4,
    height: int = 4,
    thresholds: list | None = None,
    decimals: int | None = None,
) -> dict:
    defaults = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": _thresholds(thresholds or [("blue", None)]),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "reduceOptions": _reduce(),
        "colorMode": "background" if thresholds else "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "auto",
        "wideLayout": True,
        "showPercentChange": False,
    }
    return _panel("stat", title, queries, description, width, height, defaults, options)


def bargauge(
    title: str,
    *queries: dict,
    description: str,
    unit: str = "percentunit",
    thresholds: list,
    width: int = 8,
    height: int = 8,
    maximum: float | None = 1,
) -> dict:
    defaults = {"unit": unit, "min": 0, "color": {"mode": "thresholds"}, "thresholds": _thresholds(thresholds)}
    if maximum is not None:
        defaults["max"] = maximum
    options = {
        "reduceOptions": _reduce(),
        "displayMode": "gradient",
        "orientation": "horizontal",
        "showUnfilled": True,
        "valueMode": "color",
        "namePlacement": "auto",
        "sizing": "auto",
        "minVizHeight": 16,
        "minVizWidth": 8,
        "maxVizHeight": 300,
    }
    return _panel("bargauge", title, queries, description, width, height, defaults, options)


def heatmap(title: str, target: dict, *, description: str, unit: str = "s", width: int = 8, height: int = 8) -> dict:
    """A histogram's buckets over time (the query sums by `le`, format heatmap)."""
    options = {
        "calculate": False,
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "exponent": 0.5, "steps": 64},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-09},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
        "yAxis": {"axisPlacement": "left", "unit": unit},
    }
    return _panel("heatmap", title, [target], description, width, height, {}, options)


def table(
    title: str,
    columns: list[tuple[str, str, str]],
    *,
    description: str,
    key: str,
    link: str = "",
    width: int = 24,
    height: int = 8,
) -> dict:
    """One row per value of the `key` label(s) (comma-separated), one column per (name, instant query, unit), joined
    by Grafana's merge; sorted by the first column, largest first. `link`: a URL for the first key column's cells."""
    queries = [query(expr, table=True) for _, expr, _ in columns]
    panel = _panel(
        "table",
        title,
        queries,
        description,
        width,
        height,
        {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}, "thresholds": _thresholds([("green", None)])},
        {
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False},
            "sortBy": [{"displayName": columns[0][0], "desc": True}],
        },
    )
    keys = [name.strip() for name in key.split(",")]
    renames = {f"Value #{chr(ord('A') + index)}": name for index, (name, _, _) in enumerate(columns)}
    order = {name: index for index, name in enumerate([*keys, *renames])}
    panel["transformations"] = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True},
                "includeByName": {name: True for name in [*keys, *renames]},
                "indexByName": order,
                "renameByName": renames,
            },
        },
    ]
    overrides = [
        {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": unit}]}
        for name, _, unit in columns
    ]
    if link:
        overrides.append(
            {
                "matcher": {"id": "byName", "options": keys[0]},
                "properties": [{"id": "links", "value": [{"title": f"Open this {keys[0]}", "url": link}]}],
            }
        )
    panel["fieldConfig"]["overrides"] = overrides
    return panel


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def label_variable(name: str, label: str, selector: str, *, every: bool, description: str) -> dict:
    """A variable holding the values of label `name` on the series of `selector` (Grafana's label_values).
    `every`: several may be chosen and "All" matches anything (`.*`), so use it as `name=~"$name"`."""
    definition = f"label_values({selector}, {name})"
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": every,
        "multi": every,
        **({"allValue": ".*"} if every else {}),
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def dashboard(uid: str, title: str, description: str, variables: list[dict], rows: list[tuple[str, list[dict]]]):
    """Rows of panels laid out left to right, wrapping at the grid's width; ids in order."""
    panels, y, next_id = [], 0, 1
    for row_title, row_panels in rows:
        panels.append(
            {"type": "row", "title": row_title, "id": next_id, "collapsed": False, "panels": [], "gridPos": {}}
        )
        panels[-1]["gridPos"] = {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row_panels:
            width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
            if x + width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panel = {"id": next_id, **panel, "gridPos": {"h": height, "w": width, "x": x, "y": y}}
            panels.append(panel)
            next_id, x, line_height = next_id + 1, x + width, max(line_height, height)
        y += line_height
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [
            {
                "title": "MicroVM dashboards",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": variables},
        "panels": panels,
    }
