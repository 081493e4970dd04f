"""Runs inside each Python kernel (loaded once at kernel start by mvm_code_server): two extra IPython display
formatters, so that whatever shows a matplotlib Figure or a pandas DataFrame also sends it as data.

- `application/vnd.mvm.chart+json`: a Figure's chart (type, title, axis labels, the plotted values), computed from
  the Figure object when it is displayed (the inline backend displays every open figure after a cell), before it
  is closed.
- `application/vnd.mvm.table+json`: a DataFrame's columns, index and first rows.

Both match objects by class name, so neither matplotlib nor pandas is imported until the user's code imports
them. A formatter never raises: a figure it cannot read gives `type: unknown`.
This module must run on Debian bookworm's python3 (3.11) with its matplotlib 3.6 and pandas 1.5.
"""

import json
import math

CHART_MIME = "application/vnd.mvm.chart+json"
TABLE_MIME = "application/vnd.mvm.table+json"
MAX_POINTS = 10_000  # values per chart, over all its elements
MAX_ROWS = 1_000  # rows of a table


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number) or math.isinf(number):
        return None
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


class _Budget:
    def __init__(self, limit):
        self.left = limit
        self.truncated = False

    def take(self, items):
        items = list(items)
        if len(items) > self.left:
            items, self.truncated = items[: max(self.left, 0)], True
        self.left -= len(items)
        return items


def _label(artist):
    label = artist.get_label() or ""
    return "" if label.startswith("_") else label  # matplotlib's own names (`_child0`) are no label


def _tick_label(axis, value):
    try:
        label = axis.get_major_formatter()(value)
    except Exception:
        label = ""
    return label if label else _number(value)


def _boxes(ax):
    """Box plots draw each box as a closed 5-point line (or a PathPatch when patch_artist=True), its median as a
    2-point horizontal line and its whiskers as 2-point vertical lines."""
    from matplotlib.patches import PathPatch

    rectangles = []
    for line in ax.get_lines():
        xs, ys = line.get_xdata(), line.get_ydata()
        if len(xs) == 5 and xs[0] == xs[-1] and ys[0] == ys[-1]:
            rectangles.append((min(xs), max(xs), min(ys), max(ys)))
    for patch in ax.patches:
        if isinstance(patch, PathPatch):
            vertices = patch.get_path().vertices
            rectangles.append((vertices[:, 0].min(), vertices[:, 0].max(), vertices[:, 1].min(), vertices[:, 1].max()))
    boxes = []
    for x0, x1, y0, y1 in rectangles:
        centre = (x0 + x1) / 2
        box = {"label": _tick_label(ax.xaxis, centre), "first_quartile": _number(y0), "third_quartile": _number(y1)}
        for line in ax.get_lines():
            xs, ys = line.get_xdata(), line.get_ydata()
            if len(xs) != 2:
                continue
            if ys[0] == ys[1] and x0 <= min(xs) and max(xs) <= x1 and y0 <= ys[0] <= y1 and xs[0] != xs[1]:
                box["median"] = _number(ys[0])
            elif xs[0] == xs[1] == centre and ys[0] != ys[1]:
                if max(ys) <= y0:
                    box["min"] = _number(min(ys))
                elif min(ys) >= y1:
                    box["max"] = _number(max(ys))
        box["outliers"] = [
            _number(y)
            for line in ax.get_lines()
            if line.get_linestyle() in ("None", "none", "") and len(line.get_xdata())
            for x, y in zip(line.get_xdata(), line.get_ydata(), strict=False)
            if x == centre
        ]
        boxes.append(box)
    return boxes


def _axes_chart(ax, budget):
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    chart = {"title": ax.get_title(), "x_label": ax.get_xlabel(), "y_label": ax.get_ylabel()}
    wedges = [patch for patch in ax.patches if isinstance(patch, Wedge)]
    bars = [container for container in ax.containers if isinstance(container, BarContainer)]
    scatters = [collection for collection in ax.collections if isinstance(collection, PathCollection)]
    boxes = _boxes(ax)
    if wedges:
        total = sum(abs(w.theta2 - w.theta1) for w in wedges) or 1.0
        chart["type"] = "pie"
        chart["elements"] = [
            {
                "label": _label(w),
                "angle": _number(w.theta2 - w.theta1),
                "fraction": abs(w.theta2 - w.theta1) / total,
            }
            for w in budget.take(wedges)
        ]
    elif boxes:
        chart["type"] = "box"
        chart["elements"] = budget.take(boxes)
    elif bars:
        chart["type"] = "bar"
        chart["elements"] = []
        for container in bars:
            group = _label(container)
            for rect in budget.take(container.patches):
                horizontal = getattr(container, "orientation", "vertical") == "horizontal"
                if horizontal:
                    where, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
                else:
                    where, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
                label = _tick_label(ax.yaxis if horizontal else ax.xaxis, where)
                element = {"label": label, "value": _number(value)}
                if group:
                    element["group"] = group
                chart["elements"].append(element)
    elif scatters and not ax.get_lines():
        chart["type"] = "scatter"
        chart["elements"] = [
            {"label": _label(c), "points": [[_number(x), _number(y)] for x, y in budget.take(c.get_offsets())]}
            for c in scatters
        ]
    elif ax.get_lines():
        chart["type"] = "line"
        chart["elements"] = [
            {
                "label": _label(line),
                "points": [
                    [_number(x), _number(y)]
                    for x, y in budget.take(zip(line.get_xdata(), line.get_ydata(), strict=False))
                ],
            }
            for line in ax.get_lines()
        ]
    else:
        chart["type"] = "unknown"
        chart["elements"] = []
    return chart


def figure_chart(figure):
    """The chart a Figure shows: one axes' chart, or `unknown` with each axes' chart as its elements."""
    try:
        budget = _Budget(MAX_POINTS)
        axes = [ax for ax in figure.get_axes() if ax.get_visible()]
        if len(axes) == 1:
            chart = _axes_chart(axes[0], budget)
        else:
            title = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else ""
            elements = [_axes_chart(ax, budget) for ax in axes]
            chart = {"type": "unknown", "title": title, "x_label": "", "y_label": "", "elements": elements}
        if budget.truncated:
            chart["truncated"] = True
        return json.loads(json.dumps(chart, default=str))
    except Exception as error:  # never break the figure's display
        return {"type": "unknown", "title": "", "x_label": "", "y_label": "", "elements": [], "error": repr(error)}


def dataframe_table(frame):
    """A DataFrame as {columns, index, rows}: at most MAX_ROWS rows, values as JSON (NaN -> null, dates ISO)."""
    try:
        split = json.loads(frame.head(MAX_ROWS).to_json(orient="split", date_format="iso", default_handler=str))
        table = {
            "columns": [str(column) for column in frame.columns],
            "index": split.get("index", []),
            "rows": split.get("data", []),
            "total_rows": len(frame),
        }
        if len(frame) > MAX_ROWS:
            table["truncated"] = True
        return table
    except Exception:
        return None


def _is_a(obj, module, name):
    return any(cls.__name__ == name and cls.__module__.split(".")[0] == module for cls in type(obj).__mro__)


def install(shell):
    """Registers both formatters on an IPython shell (the kernel's `get_ipython()`). They match by class name rather
    than through `for_type`: activating the inline backend drops every formatter's Figure printer."""
    from IPython.core.formatters import JSONFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(JSONFormatter):
        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_mvm_chart_")

        def __call__(self, obj):
            return figure_chart(obj) if self.enabled and _is_a(obj, "matplotlib", "Figure") else None

    class TableFormatter(JSONFormatter):
        format_type = Unicode(TABLE_MIME)
        print_method = ObjectName("_repr_mvm_table_")

        def __call__(self, obj):
            return dataframe_table(obj) if self.enabled and _is_a(obj, "pandas", "DataFrame") else None

    formatters = shell.display_formatter.formatters
    formatters[CHART_MIME] = ChartFormatter(parent=shell.display_formatter)
    formatters[TABLE_MIME] = TableFormatter(parent=shell.display_formatter)
