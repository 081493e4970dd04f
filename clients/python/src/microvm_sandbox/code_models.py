"""What `run_code` returns, E2B code-interpreter style: an `Execution` with its `Result`s (every MIME form the kernel
gave, matplotlib figures also as `chart` data and pandas DataFrames as `table` data), its `Logs` and its
`ExecutionError`; and `CodeContext`, one kernel with its own state. Nothing here talks to the server:
`ExecutionBuilder` folds the events of one RunCode stream into an Execution."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from microvm.sandbox.v1 import code_pb2
from microvm.sandbox.v1 import code_service_pb2 as code_api

# The forms a Result may carry, in the order `formats()` names them.
TEXT_FORMATS = ("text", "html", "markdown", "svg", "latex", "javascript")
BINARY_FORMATS = ("png", "jpeg", "pdf")  # bytes in the proto, base64 text here (as Jupyter and E2B give them)
FILE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "svg": "svg", "pdf": "pdf"}
STATUS_NAMES = {
    code_pb2.CODE_RUN_STATUS_OK: "ok",
    code_pb2.CODE_RUN_STATUS_ERROR: "error",
    code_pb2.CODE_RUN_STATUS_TIMEOUT: "timeout",
    code_pb2.CODE_RUN_STATUS_KERNEL_DIED: "kernel_died",
}


@dataclass
class CodeContext:
    """A code context: one kernel with its own variables, imports and working directory. `id` is `default`
    (Python's), `default-<language>` or a generated one; pass the object or its id as `context=`."""

    id: str
    language: str
    cwd: str = ""
    envs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: code_pb2.CodeContext) -> CodeContext:
        """The context of a CodeContext message."""
        return cls(message.id, message.language, message.cwd, dict(message.env))

    def to_dict(self) -> dict[str, Any]:
        """The context as plain data."""
        return {"id": self.id, "language": self.language, "cwd": self.cwd, "envs": dict(self.envs)}


def context_id(context: CodeContext | str | None) -> str:
    """The id of a context given as an object or an id; empty for none (the language's default context)."""
    if context is None:
        return ""
    return context.id if isinstance(context, CodeContext) else context


@dataclass
class ExecutionError:
    """The run raised: the exception's `name` (`ZeroDivisionError`; `TimeoutError` when the run passed its timeout,
    `KernelDied` when the kernel died under it), its `value`, and its `traceback` (lines joined by newlines)."""

    name: str
    value: str
    traceback: str

    @classmethod
    def from_message(cls, message: code_pb2.CodeError) -> ExecutionError:
        """The error of a CodeError message."""
        return cls(message.name, message.value, "\n".join(message.traceback))

    def to_dict(self) -> dict[str, str]:
        """The error as plain data."""
        return {"name": self.name, "value": self.value, "traceback": self.traceback}

    def __str__(self) -> str:
        return f"{self.name}: {self.value}" if self.value else self.name


@dataclass
class Logs:
    """What the run wrote, chunk by chunk as the kernel sent it: `stdout` and `stderr`."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        """The logs as plain data."""
        return {"stdout": list(self.stdout), "stderr": list(self.stderr)}


@dataclass
class Result:
    """One result of a run: the cell's value (`is_main_result`) or something it displayed, in every form the kernel
    gave. Text forms are str; `png`, `jpeg` and `pdf` are base64 text (as Jupyter and E2B give them: `save()` or
    `image_bytes()` decode them); `json` is the parsed object; `chart` (a matplotlib figure read as data: type,
    title, x_label, y_label, elements, truncated) and `table` (a DataFrame's first rows: columns, index, rows,
    total_rows, truncated) are dicts; `extra` holds other MIME types as the kernel gave them."""

    is_main_result: bool = False
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    latex: str | None = None
    javascript: str | None = None
    json: Any = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    chart: dict[str, Any] | None = None
    table: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: code_pb2.CodeResult) -> Result:
        """The result of a CodeResult message (empty forms are None)."""
        result = cls(is_main_result=message.is_main_result, extra=dict(message.other))
        for name in TEXT_FORMATS:
            setattr(result, name, getattr(message, name) or None)
        for name in BINARY_FORMATS:
            data = getattr(message, name)
            setattr(result, name, base64.b64encode(data).decode() if data else None)
        if message.json:
            try:
                result.json = json.loads(message.json)
            except ValueError:  # keep what came rather than lose it
                result.extra["application/json"] = message.json
        if message.HasField("chart"):
            result.chart = chart_dict(message.chart)
        if message.HasField("table"):
            result.table = table_dict(message.table)
        return result

    def formats(self) -> list[str]:
        """The names of the forms present, e.g. ["text", "png", "chart"] (then the `extra` MIME types)."""
        names = [*TEXT_FORMATS, *BINARY_FORMATS, "json", "chart", "table"]
        return [name for name in names if getattr(self, name) is not None] + list(self.extra)

    def image_bytes(self, form: str | None = None) -> bytes:
        """The bytes of an image or document form: `form` (png, jpeg, svg, pdf), else the first present of those.
        ValueError when the result has none."""
        for name in [form] if form else FILE_EXTENSIONS:
            value = getattr(self, name, None) if name in FILE_EXTENSIONS else None
            if value is not None:
                return value.encode() if name == "svg" else base64.b64decode(value)
        raise ValueError(f"the result has no {form or 'image'} form (it has: {', '.join(self.formats()) or 'none'})")

    def save(self, path: str | Path, form: str | None = None) -> Path:
        """Writes the image (or PDF) to `path`: `form` (png, jpeg, svg, pdf), else the first present of those.
        Returns the path. ValueError when the result has none."""
        target = Path(path)
        target.write_bytes(self.image_bytes(form))
        return target

    def file_forms(self) -> list[str]:
        """The forms present that are files of their own (png, jpeg, svg, pdf)."""
        return [name for name in FILE_EXTENSIONS if getattr(self, name) is not None]

    def to_dict(self) -> dict[str, Any]:
        """The forms present as plain data (binary ones base64), with `is_main_result`."""
        data: dict[str, Any] = {"is_main_result": self.is_main_result}
        for name in self.formats():
            data[name] = getattr(self, name) if name not in self.extra else self.extra[name]
        return data

    def __str__(self) -> str:
        return self.text or ""

    # Jupyter shows a Result as its richest form when it is displayed in a notebook.
    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_png_(self) -> str | None:
        return self.png

    def _repr_svg_(self) -> str | None:
        return self.svg


def chart_dict(chart: code_pb2.Chart) -> dict[str, Any]:
    """A Chart message as plain data; `error` only when the figure could not be read."""
    data: dict[str, Any] = {
        "type": chart.type,
        "title": chart.title,
        "x_label": chart.x_label,
        "y_label": chart.y_label,
        "elements": json_format.MessageToDict(chart.elements),
        "truncated": chart.truncated,
    }
    if chart.error:
        data["error"] = chart.error
    return data


def table_dict(table: code_pb2.Table) -> dict[str, Any]:
    """A Table message as plain data."""
    return {
        "columns": list(table.columns),
        "index": json_format.MessageToDict(table.index),
        "rows": json_format.MessageToDict(table.rows),
        "total_rows": table.total_rows,
        "truncated": table.truncated,
    }


@dataclass
class Execution:
    """One run of code: its `results` (displays and the cell's value), `logs` (stdout and stderr), `error` (None
    unless it raised, passed its timeout or its kernel died), `execution_count` in its context (None when the kernel
    gave none), `status` ("ok", "error", "timeout", "kernel_died"), the `context` it ran in, `restarted` (the
    context's kernel had died and was started afresh for this run: earlier state is lost) and `truncated` (output
    beyond the run's bound was left out)."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    status: str = ""
    context: str = ""
    restarted: bool = False
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The text of the cell's value (the main result), or None when it had none."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_dict(self) -> dict[str, Any]:
        """The execution as plain data (images as base64)."""
        return {
            "results": [result.to_dict() for result in self.results],
            "logs": self.logs.to_dict(),
            "error": self.error.to_dict() if self.error else None,
            "execution_count": self.execution_count,
            "status": self.status,
            "context": self.context,
            "restarted": self.restarted,
            "truncated": self.truncated,
        }

    def to_json(self, indent: int | None = None) -> str:
        """The execution as JSON text (see `to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)


Event = str | Result | ExecutionError | None


class ExecutionBuilder:
    """Folds the events of one RunCode stream into an Execution. `add` returns what a callback should get: the
    event's kind ("stdout", "stderr", "result", "error") and its value, or None for events no callback sees."""

    def __init__(self) -> None:
        self.execution = Execution()
        self.ended = False

    def add(self, response: code_api.RunCodeResponse) -> tuple[str, Event] | None:
        kind = response.WhichOneof("event")
        if kind == "stdout":
            self.execution.logs.stdout.append(response.stdout.text)
            return kind, response.stdout.text
        if kind == "stderr":
            self.execution.logs.stderr.append(response.stderr.text)
            return kind, response.stderr.text
        if kind == "result":
            result = Result.from_message(response.result)
            self.execution.results.append(result)
            return kind, result
        if kind == "error":
            self.execution.error = ExecutionError.from_message(response.error)
            return kind, self.execution.error
        if kind == "end":
            end = response.end
            self.execution.status = STATUS_NAMES.get(end.status, "error")
            self.execution.execution_count = end.execution_count or None
            self.execution.context = end.context
            self.execution.restarted = end.restarted
            self.execution.truncated = end.truncated
            self.ended = True
        return None  # end, keepalive, or an event this SDK does not know yet


__all__ = [
    "CodeContext",
    "Execution",
    "ExecutionBuilder",
    "ExecutionError",
    "Logs",
    "Result",
    "context_id",
]
