"""The code server's JSON events (images/templates/code-interpreter/mvm_code_server.py) as CodeService messages.

A result's MIME bundle becomes typed fields: text forms as text, images and PDFs decoded from the base64 Jupyter
sends them in, application/json as JSON text, anything else kept in `other`. A refusal becomes the status the
caller gets.
"""

from __future__ import annotations

import base64
import binascii
import json

from google.protobuf import struct_pb2

from microvm.sandbox.v1 import code_pb2
from microvm.sandbox.v1 import code_service_pb2 as api
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError

TEXT_FORMS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "text/latex": "latex",
    "application/javascript": "javascript",
}
BINARY_FORMS = {"image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf"}
TEXT_PIECE_CHARS = 256 << 10  # at most 1 MiB of UTF-8
MAX_RESULT_BYTES = 3 << 20  # one message, under the 4 MiB every gRPC client takes by default
STATUS = {
    "ok": code_pb2.CODE_RUN_STATUS_OK,
    "error": code_pb2.CODE_RUN_STATUS_ERROR,
    "timeout": code_pb2.CODE_RUN_STATUS_TIMEOUT,
    "kernel_died": code_pb2.CODE_RUN_STATUS_KERNEL_DIED,
}


def _text(value) -> str:
    """Jupyter may split a text form into a list of lines."""
    if isinstance(value, list):
        return "".join(str(part) for part in value)
    return value if isinstance(value, str) else json.dumps(value)


def _list(values) -> struct_pb2.ListValue:
    listed = struct_pb2.ListValue()
    listed.extend(values if isinstance(values, list) else [])
    return listed


def chart_of(chart: dict) -> code_pb2.Chart:
    return code_pb2.Chart(
        type=str(chart.get("type", "unknown")),
        title=str(chart.get("title") or ""),
        x_label=str(chart.get("x_label") or ""),
        y_label=str(chart.get("y_label") or ""),
        elements=_list(chart.get("elements")),
        truncated=bool(chart.get("truncated")),
        error=str(chart.get("error") or ""),
    )


def table_of(table: dict) -> code_pb2.Table:
    return code_pb2.Table(
        columns=[str(column) for column in table.get("columns", [])],
        index=_list(table.get("index")),
        rows=_list(table.get("rows")),
        total_rows=int(table.get("total_rows") or 0),
        truncated=bool(table.get("truncated")),
    )


def result_of(event: dict) -> code_pb2.CodeResult:
    result = code_pb2.CodeResult(is_main_result=bool(event.get("is_main_result")))
    for mime, value in (event.get("data") or {}).items():
        if mime in TEXT_FORMS:
            setattr(result, TEXT_FORMS[mime], _text(value))
        elif mime in BINARY_FORMS:
            try:
                setattr(result, BINARY_FORMS[mime], base64.b64decode(_text(value).replace("\n", ""), validate=True))
            except (binascii.Error, ValueError):
                result.other[mime] = _text(value)  # not base64 after all: given as it came
        elif mime == "application/json":
            result.json = json.dumps(value)
        else:
            result.other[mime] = _text(value)
    if isinstance(event.get("chart"), dict):
        result.chart.CopyFrom(chart_of(event["chart"]))
    if isinstance(event.get("table"), dict):
        result.table.CopyFrom(table_of(event["table"]))
    return result


def responses_of(event: dict, context: str) -> list[api.RunCodeResponse]:
    """The messages for one event of a run: output in pieces every client takes (a gRPC message is at most 4 MiB by
    default), a result too large for one message said instead of sent; none for an event this relay does not know
    (a newer code server)."""
    kind = event.get("type")
    if kind in ("stdout", "stderr"):
        text = str(event.get("text", ""))
        return [
            api.RunCodeResponse(**{kind: code_pb2.CodeOutput(text=text[start : start + TEXT_PIECE_CHARS])})
            for start in range(0, max(len(text), 1), TEXT_PIECE_CHARS)
        ]
    if kind == "result":
        result = result_of(event)
        if result.ByteSize() > MAX_RESULT_BYTES:
            forms = ", ".join(sorted(event.get("data") or {}))
            result = code_pb2.CodeResult(
                is_main_result=result.is_main_result,
                text=f"[a result of {result.ByteSize()} bytes ({forms}) left out: larger than {MAX_RESULT_BYTES}]",
            )
        return [api.RunCodeResponse(result=result)]
    response = _response_of(event, context)
    return [] if response is None else [response]


def _response_of(event: dict, context: str) -> api.RunCodeResponse | None:
    kind = event.get("type")
    if kind == "error":
        return api.RunCodeResponse(
            error=code_pb2.CodeError(
                name=str(event.get("name", "")),
                value=str(event.get("value", "")),
                traceback=[str(line) for line in event.get("traceback") or []],
            )
        )
    if kind == "end":
        return api.RunCodeResponse(
            end=code_pb2.CodeRunEnd(
                status=STATUS.get(event.get("status"), code_pb2.CODE_RUN_STATUS_ERROR),
                execution_count=int(event.get("execution_count") or 0),
                context=str(event.get("context") or context),
                restarted=bool(event.get("restarted")),
                truncated=bool(event.get("truncated")),
            )
        )
    return None


def context_of(described: dict) -> code_pb2.CodeContext:
    return code_pb2.CodeContext(
        id=str(described.get("id", "")),
        language=str(described.get("language", "")),
        cwd=str(described.get("cwd") or ""),
        env={str(k): str(v) for k, v in (described.get("env") or {}).items()},
    )


def refusal(event: dict) -> ServiceError:
    """The status of a request the code server refused."""
    name, value = event.get("name"), str(event.get("value", ""))
    if name == "context_not_found":
        return NotFound(value, reason="CODE_CONTEXT_NOT_FOUND")
    if name == "unknown_language":
        languages = event.get("languages") or []
        if languages and "one of" not in value:
            value = f"{value}; this sandbox has kernels for: {', '.join(map(str, languages))}"
        return InvalidArgument(value, reason="UNKNOWN_LANGUAGE")
    if name == "bad_request":
        return InvalidArgument(value, reason="INVALID_REQUEST")
    # The code server could not do it (a kernel that would not start): the sandbox's state, not our bug.
    return FailedPrecondition(f"the sandbox's code server failed: {value}", reason="CODE_SERVER_FAILED")
