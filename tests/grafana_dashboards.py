"""Reading the Grafana dashboards of deploy/grafana/dashboards in tests: their panels and queries, Grafana's
template variables filled in, and the metric names a PromQL expression reads."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"

# Grafana's own variables, as they come out for a one-hour range at a 5 s scrape interval.
GRAFANA_GLOBALS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# $name, ${name}, ${name:format}, [[name]] (Grafana's forms). `$1` in label_replace is not a variable.
VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)(?::\w+)?\]\]")

# PromQL words that are not metric names when not followed by "(".
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
AGGREGATIONS |= {"quantile"}
NUMBERS = {"inf", "nan"}


def dashboards() -> dict[str, dict]:
    """{file name: dashboard} of every dashboard JSON."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])


def variable_query(variable: dict) -> str:
    """A query variable's query text (Grafana keeps it as a string or as {"query": ...})."""
    definition = variable.get("query")
    if isinstance(definition, dict):
        definition = definition.get("query")
    return definition or variable.get("definition", "")


def substitute(text: str, values: dict[str, str]) -> str:
    """`text` with Grafana's variables replaced by `values` (and GRAFANA_GLOBALS); KeyError names one it lacks."""

    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        known = {**GRAFANA_GLOBALS, **values}
        if name not in known:
            raise KeyError(f"${name} is not a variable of this dashboard nor one of Grafana's")
        return known[name]

    return VARIABLE.sub(value, text)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label matchers, ranges and label
    lists, that are not followed by "(" (functions, aggregations) and are not keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"#[^\n]*", "", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        name = match.group(1)
        if name not in KEYWORDS and name not in AGGREGATIONS and name.lower() not in NUMBERS:
            names.add(name)
    return names


def label_values_query(definition: str) -> tuple[str, str]:
    """(series selector or "", label) of Grafana's `label_values(selector, label)` / `label_values(label)`."""
    match = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?([A-Za-z_]\w*)\s*\)\s*", definition, re.S)
    if match is None:
        raise ValueError(f"not a label_values(...) query: {definition!r}")
    return match.group(1) or "", match.group(2)


def recording_rule_names(rules_dir: Path = RULES_DIR) -> set[str]:
    names = set()
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            names |= {rule["record"] for rule in group.get("rules", []) if "record" in rule}
    return names
