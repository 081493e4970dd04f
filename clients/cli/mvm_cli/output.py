"""How `mvm` prints: tables, key/value views, JSON, and one-line errors.

Tables have a header row (`--no-headers` leaves it out, for `awk` and `cut`; `-q` prints only ids). `--json` prints
protobuf's JSON mapping of the messages (the HTTP API's field names), the stable format for scripts: every field,
defaults included.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from microvm.sandbox.v1 import sandbox_pb2
from microvm_sandbox import SandboxError, SandboxNotFound, SnapshotNotFound
from mvm_cli.parsing import CliError, format_duration


def short(name: str) -> str:
    """The id of a resource name (`sandboxes/x` -> `x`)."""
    return name.split("/", 1)[1] if "/" in name else name


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], header: bool = True) -> str:
    """Rows in aligned columns (two spaces apart), with `headers` on top unless header=False. The last column is
    not padded."""
    lines = [[str(cell) for cell in row] for row in rows]
    if header:
        lines.insert(0, list(headers))
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < len(headers) - 1 else cell for i, cell in enumerate(line)).rstrip()
        for line in lines
    )


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """A key/value view, one field a line, keys aligned."""
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key + ':':{width + 1}}  {value}".rstrip() for key, value in pairs)


def as_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def to_json(value: Message | Sequence[Message]) -> str:
    """A message as a JSON object, or a list of them as an array (protobuf's JSON mapping, camelCase names)."""
    data = as_dict(value) if isinstance(value, Message) else [as_dict(m) for m in value]
    return json.dumps(data, indent=2)


def emit(text: str, stream: TextIO | None = None) -> None:
    if text:
        print(text, file=stream or sys.stdout)


# --- sandboxes ------------------------------------------------------------------------------------------
def state(sandbox: sandbox_pb2.Sandbox) -> str:
    return sandbox_pb2.SandboxState.Name(sandbox.state).removeprefix("SANDBOX_STATE_")


def labels_text(labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def until(stamp, now: float | None = None) -> str:
    """`in 9m12s` / `expired` for a Timestamp; `-` when unset."""
    if not stamp.seconds:
        return "-"
    left = stamp.seconds - (now if now is not None else time.time())
    return f"in {format_duration(left)}" if left > 0 else "expired"


def ago(stamp, now: float | None = None) -> str:
    """`3m ago` for a Timestamp; `-` when unset."""
    if not stamp.seconds:
        return "-"
    return f"{format_duration((now if now is not None else time.time()) - stamp.seconds)} ago"


def when(stamp) -> str:
    """`2026-11-30T11:20:05Z` for a Timestamp; `-` when unset."""
    return stamp.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ") if stamp.seconds else "-"


def egress_text(sandbox: sandbox_pb2.Sandbox) -> str:
    """`none`, `full` or `allow-list(203.0.113.0/24:443)`."""
    mode = sandbox_pb2.EgressMode.Name(sandbox.network_policy.egress or 1).removeprefix("EGRESS_MODE_").lower()
    rules = ",".join(
        r.cidr + (":" + "+".join(map(str, r.ports)) if r.ports else "") for r in sandbox.network_policy.allow
    )
    return mode.replace("_", "-") + (f"({rules})" if rules else "")


def ports_text(sandbox: sandbox_pb2.Sandbox) -> str:
    return ",".join(f"{p.host_address}:{p.host_port}->{p.guest_port}" for p in sandbox.exposed_ports) or "-"


SANDBOX_COLUMNS = ("ID", "STATE", "TEMPLATE", "CPU", "MEMORY", "NODE", "HYPERVISOR", "IP", "EXPIRES", "LABELS")


def sandbox_row(sandbox: sandbox_pb2.Sandbox, now: float | None = None) -> list[object]:
    return [
        short(sandbox.name),
        state(sandbox),
        sandbox.template,
        sandbox.vcpus,
        f"{sandbox.memory_mib}MiB",
        sandbox.node or "-",
        sandbox.hypervisor or "-",
        sandbox.ip_address or "-",
        until(sandbox.expire_time, now),
        labels_text(sandbox.labels),
    ]


def sandbox_table(sandboxes: Sequence[sandbox_pb2.Sandbox], header: bool = True) -> str:
    return table(SANDBOX_COLUMNS, [sandbox_row(s) for s in sandboxes], header)


def sandbox_view(sandbox: sandbox_pb2.Sandbox, now: float | None = None) -> str:
    """Every field of one sandbox, one a line."""
    pairs: list[tuple[str, object]] = [
        ("id", short(sandbox.name)),
        ("state", state(sandbox) + (f" ({sandbox.failure_message})" if sandbox.failure_message else "")),
        ("template", sandbox.template),
        ("template build", sandbox.template_build or "-"),
        ("vcpus", sandbox.vcpus),
        ("memory", f"{sandbox.memory_mib} MiB"),
        ("node", sandbox.node or "-"),
        ("hypervisor", sandbox.hypervisor or "-"),
        ("created", f"{when(sandbox.create_time)} ({ago(sandbox.create_time, now)})"),
        ("expires", f"{when(sandbox.expire_time)} ({until(sandbox.expire_time, now)})"),
        ("ip", sandbox.ip_address or "- (no networking)"),
        ("egress", egress_text(sandbox) if sandbox.ip_address else "-"),
        ("ports", ports_text(sandbox)),
        ("labels", labels_text(sandbox.labels)),
        ("env", ",".join(f"{k}={v}" for k, v in sorted(sandbox.env.items())) or "-"),
        ("node selector", labels_text(sandbox.node_selector)),
        ("from snapshot", short(sandbox.source_snapshot) if sandbox.source_snapshot else "-"),
    ]
    return fields(pairs)


# --- snapshots ------------------------------------------------------------------------------------------
SNAPSHOT_COLUMNS = ("ID", "SOURCE", "SIZE", "CREATED", "EXPIRES", "LABELS")


def size_text(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f}MB"


def snapshot_table(snapshots: Sequence[sandbox_pb2.Snapshot], header: bool = True, now: float | None = None) -> str:
    """Snapshots as a table whose ID column is the lineage tree: children under the snapshot their source was
    restored from."""
    by_name = {s.name: s for s in snapshots}
    children: dict[str, list[sandbox_pb2.Snapshot]] = {}
    for snapshot in snapshots:
        parent = snapshot.parent_snapshot if snapshot.parent_snapshot in by_name else ""
        children.setdefault(parent, []).append(snapshot)
    rows: list[list[object]] = []

    def walk(parent: str, depth: int) -> None:
        for snapshot in sorted(children.get(parent, []), key=lambda s: (s.create_time.ToNanoseconds(), s.name)):
            rows.append(
                [
                    ("   " * (depth - 1) + "└─ " if depth else "") + short(snapshot.name),
                    short(snapshot.source_sandbox),
                    size_text(snapshot.size_bytes),
                    ago(snapshot.create_time, now),
                    until(snapshot.expire_time, now) if snapshot.HasField("expire_time") else "never",
                    labels_text(snapshot.labels),
                ]
            )
            walk(snapshot.name, depth + 1)

    walk("", 0)
    return table(SNAPSHOT_COLUMNS, rows, header)


def snapshot_view(snapshot: sandbox_pb2.Snapshot, now: float | None = None) -> str:
    return fields(
        [
            ("id", short(snapshot.name)),
            ("state", sandbox_pb2.SnapshotState.Name(snapshot.state).removeprefix("SNAPSHOT_STATE_")),
            ("source", short(snapshot.source_sandbox)),
            ("parent", short(snapshot.parent_snapshot) if snapshot.parent_snapshot else "-"),
            ("template", snapshot.template),
            ("vcpus", snapshot.vcpus),
            ("memory", f"{snapshot.memory_mib} MiB"),
            ("size", size_text(snapshot.size_bytes)),
            ("created", f"{when(snapshot.create_time)} ({ago(snapshot.create_time, now)})"),
            (
                "expires",
                f"{when(snapshot.expire_time)} ({until(snapshot.expire_time, now)})"
                if snapshot.HasField("expire_time")
                else "never",
            ),
            ("labels", labels_text(snapshot.labels)),
        ]
    )


# --- errors ---------------------------------------------------------------------------------------------
def error_line(error: BaseException, gateway: str = "") -> str:
    """What went wrong, in one line without the `mvm: ` prefix: the gRPC status name and the server's message
    (for a missing sandbox or snapshot, which one), or the local cause."""
    if isinstance(error, CliError):
        return str(error)
    if isinstance(error, grpc.RpcError) and not isinstance(error, SandboxError):
        from microvm_sandbox.errors import from_rpc_error

        error = from_rpc_error(error)
    if isinstance(error, SandboxError):
        message = " ".join(error.message.split())
        if error.code == "UNAVAILABLE" and ("connect" in message or "address" in message) and gateway:
            return f"UNAVAILABLE: cannot reach the gateway at {gateway} (is the stack up? `make status`): {message}"
        if isinstance(error, SandboxNotFound) and error.sandbox_id and error.sandbox_id not in message:
            message += f" (sandbox {error.sandbox_id})"
        if isinstance(error, SnapshotNotFound) and error.snapshot_id and error.snapshot_id not in message:
            message += f" (snapshot {error.snapshot_id})"
        return f"{error.code}: {message}" if error.code not in message else message
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)"


def exit_status(error: BaseException) -> int:
    """2 for something missing (NOT_FOUND) or a usage mistake, 1 otherwise."""
    if isinstance(error, CliError):
        return error.status
    code = getattr(error, "code", None)
    if callable(code):
        code = code().name if isinstance(error, grpc.RpcError) else None
    return 2 if code == "NOT_FOUND" else 1
