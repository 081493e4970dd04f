"""Our RunCode events as the JSON lines E2B's code interpreter streams from `/execute` (what e2b_code_interpreter's
`_parse_output` reads): `stdout`/`stderr` with a timestamp, `result` with every MIME form, `error` with the traceback
as one string, `number_of_executions`, then `end_of_execution`.

A result's typed fields come back under E2B's names; a matplotlib Figure's chart (our `application/vnd.mvm.chart+json`,
images/templates/code-interpreter/kernel_display.py) becomes E2B's `chart` in the shapes e2b_code_interpreter/charts.py
parses; a DataFrame's table becomes E2B's `data` ({column: [values]}, as pandas' `to_dict(orient="list")`); MIME types
with no field of their own go to `extra`, keyed by MIME type.
"""

from __future__ import annotations

import base64
import json
import time

from google.protobuf import json_format

from microvm.sandbox.v1 import code_pb2
from microvm.sandbox.v1 import code_service_pb2 as api

TEXT_FIELDS = ("text", "html", "markdown", "svg", "latex", "javascript")
BINARY_FIELDS = ("png", "jpeg", "pdf")  # bytes in our API, base64 text in E2B's (as Jupyter sends them)
# Our chart types -> E2B's ChartType; `unknown` with charts as its elements (a figure of several axes) is E2B's
# `superchart`.
CHART_TYPES = {"line": "line", "scatter": "scatter", "bar": "bar", "pie": "pie", "box": "box_and_whisker"}
TWO_D = ("line", "scatter", "bar", "box_and_whisker")
BOX_FIELDS = ("label", "min", "first_quartile", "median", "third_quartile", "max")


def line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _plain(value):
    """A value out of a google.protobuf Struct, whose numbers are all doubles: integral ones back to the ints the
    kernel sent (kernel_display's `_number` and pandas' JSON give ints for integral values)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _listed(values) -> list:
    return _plain(json_format.MessageToDict(values)) if values.values else []


def chart_of(chart: dict) -> dict:
    """One chart of ours (kernel_display's dict shape) in the shape e2b_code_interpreter's charts.py parses. What we
    do not read from a figure (tick positions and labels, scales, units, a pie's radius) is given as null or empty,
    so that the SDK's parser, which indexes every key, accepts it."""
    elements = [e for e in chart.get("elements") or [] if isinstance(e, dict)]
    kind = CHART_TYPES.get(str(chart.get("type")))
    if kind is None and elements and all("type" in e for e in elements):
        kind, elements = "superchart", [chart_of(e) for e in elements]
    out = {"type": kind or "unknown", "title": chart.get("title") or ""}
    if kind in TWO_D:
        out.update(x_label=chart.get("x_label") or None, y_label=chart.get("y_label") or None, x_unit=None, y_unit=None)
    if kind in ("line", "scatter"):
        out.update(x_ticks=[], x_tick_labels=[], x_scale=None, y_ticks=[], y_tick_labels=[], y_scale=None)
        elements = [{"label": e.get("label", ""), "points": e.get("points") or []} for e in elements]
    elif kind == "bar":
        elements = [
            {"label": e.get("label", ""), "value": e.get("value"), "group": e.get("group", "")} for e in elements
        ]
    elif kind == "pie":
        elements = [{"label": e.get("label", ""), "angle": e.get("angle"), "radius": None} for e in elements]
    elif kind == "box_and_whisker":
        elements = [{**{k: e.get(k) for k in BOX_FIELDS}, "outliers": e.get("outliers") or []} for e in elements]
    elif kind is None:
        elements = []  # an unreadable figure: nothing the SDK could parse as elements
    out["elements"] = elements
    for flag in ("truncated", "error"):
        if chart.get(flag):
            out[flag] = chart[flag]
    return out


def _chart(chart: code_pb2.Chart) -> dict:
    return chart_of(
        {
            "type": chart.type,
            "title": chart.title,
            "x_label": chart.x_label,
            "y_label": chart.y_label,
            "elements": _listed(chart.elements),
            "truncated": chart.truncated,
            "error": chart.error,
        }
    )


def _data(table: code_pb2.Table) -> dict:
    columns, rows = list(table.columns), _listed(table.rows)
    return {
        column: [row[i] if isinstance(row, list) and i < len(row) else None for row in rows]
        for i, column in enumerate(columns)
    }


def result_of(result: code_pb2.CodeResult) -> dict:
    out: dict = {"type": "result", "is_main_result": result.is_main_result}
    for field in TEXT_FIELDS:
        if value := getattr(result, field):
            out[field] = value
    for field in BINARY_FIELDS:
        if value := getattr(result, field):
            out[field] = base64.b64encode(value).decode()
    if result.json:
        out["json"] = json.loads(result.json)
    if result.HasField("chart"):
        out["chart"] = _chart(result.chart)
    if result.HasField("table"):
        out["data"] = _data(result.table)
    if result.other:
        out["extra"] = dict(result.other)
    return out


def lines_of(event: api.RunCodeResponse) -> list[bytes]:
    """The JSON lines for one RunCode event."""
    kind = event.WhichOneof("event")
    if kind in ("stdout", "stderr"):
        # Our events carry no time of their own: the time the gateway passes them on (Unix ns, as E2B's).
        return [line({"type": kind, "text": getattr(event, kind).text, "timestamp": time.time_ns()})]
    if kind == "result":
        return [line(result_of(event.result))]
    if kind == "error":
        error = event.error
        return [
            line({"type": "error", "name": error.name, "value": error.value, "traceback": "\n".join(error.traceback)})
        ]
    if kind == "end":
        ended = [line({"type": "end_of_execution"})]
        if event.end.execution_count:
            ended.insert(0, line({"type": "number_of_executions", "execution_count": event.end.execution_count}))
        return ended
    if kind == "keepalive":
        # A quiet cell still sends bytes now and then, so that a reverse proxy in front of us keeps the stream open;
        # the SDKs' parsers pass over a type they do not know.
        return [line({"type": "keepalive"})]
    return []


def failure_lines(name: str, value: str) -> list[bytes]:
    """A run cut short by our side (the sandbox's node went away mid-run): said as the run's error, then its end."""
    return [line({"type": "error", "name": name, "value": value, "traceback": ""}), line({"type": "end_of_execution"})]
