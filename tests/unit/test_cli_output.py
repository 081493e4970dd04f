"""What `mvm` prints, from messages (no server): tables, key/value views, JSON, one-line errors, summaries."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import timestamp_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm_sandbox import InvalidArgumentError, SandboxError, SandboxNotFound, SnapshotNotFound
from mvm_cli.context import for_each
from mvm_cli.main import run
from mvm_cli.output import (
    error_line,
    exit_status,
    sandbox_table,
    sandbox_view,
    snapshot_table,
    table,
    to_json,
)
from mvm_cli.parsing import CliError

NOW = 1_800_000_000


def stamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def sandbox(name: str, **fields) -> sandbox_pb2.Sandbox:
    defaults = dict(
        template="default",
        state=sandbox_pb2.SANDBOX_STATE_RUNNING,
        vcpus=1,
        memory_mib=256,
        node="n1",
        expire_time=stamp(NOW + 600),
        create_time=stamp(NOW - 60),
    )
    return sandbox_pb2.Sandbox(name=f"sandboxes/{name}", **{**defaults, **fields})


def test_a_table_aligns_its_columns_and_shows_its_header_only_when_asked():
    rows = [["sbx-1", "RUNNING", "a=1"], ["sbx-long-name", "PAUSED", "-"]]
    assert table(("ID", "STATE", "LABELS"), rows, header=True).splitlines() == [
        "ID             STATE    LABELS",
        "sbx-1          RUNNING  a=1",
        "sbx-long-name  PAUSED   -",
    ]
    assert table(("ID", "STATE", "LABELS"), rows, header=False).splitlines()[0] == "sbx-1          RUNNING  a=1"
    assert table(("ID",), [], header=True) == "ID" and table(("ID",), [], header=False) == ""
    assert table(("ID",), [["x"]]) == "ID\nx"  # a header unless --no-headers


def test_the_sandbox_table_has_a_row_per_sandbox(monkeypatch):
    monkeypatch.setattr("time.time", lambda: NOW)
    first_one = sandbox("sbx-1", labels={"b": "2", "a": "1"}, hypervisor="qemu/tcg")
    text = sandbox_table([first_one, sandbox("sbx-2", node="")], header=True)
    header, first, second = text.splitlines()
    assert header.split() == [
        "ID",
        "STATE",
        "TEMPLATE",
        "CPU",
        "MEMORY",
        "NODE",
        "HYPERVISOR",
        "IP",
        "EXPIRES",
        "LABELS",
    ]
    assert first.split() == [
        "sbx-1",
        "RUNNING",
        "default",
        "1",
        "256MiB",
        "n1",
        "qemu/tcg",
        "-",
        "in",
        "10m",
        "a=1,b=2",
    ]
    assert second.split()[5] == "-"


def test_the_sandbox_view_shows_every_field_a_line():
    view = sandbox_view(sandbox("sbx-1", env={"MODE": "test"}, ip_address="10.0.0.2"), now=NOW)
    lines = dict(line.split(":", 1) for line in view.splitlines())
    assert lines["id"].strip() == "sbx-1" and lines["env"].strip() == "MODE=test"
    assert lines["expires"].strip().endswith("(in 10m)") and lines["created"].strip().endswith("(1m ago)")
    assert lines["egress"].strip() == "none" and lines["ip"].strip() == "10.0.0.2"


def test_json_is_protobufs_mapping_with_every_field():
    one = json.loads(to_json(sandbox("sbx-1", env={"A": "1"})))
    assert one["name"] == "sandboxes/sbx-1" and one["state"] == "SANDBOX_STATE_RUNNING" and one["env"] == {"A": "1"}
    assert one["ipAddress"] == "" and one["labels"] == {}  # defaults too: scripts can rely on every key
    assert [s["name"] for s in json.loads(to_json([sandbox("a"), sandbox("b")]))] == ["sandboxes/a", "sandboxes/b"]
    assert json.loads(to_json([])) == []


def test_snapshots_print_as_a_lineage_tree():
    def snapshot(name, parent="", created=0, **fields):
        return sandbox_pb2.Snapshot(
            name=f"snapshots/{name}",
            source_sandbox="sandboxes/sbx-1",
            parent_snapshot=f"snapshots/{parent}" if parent else "",
            size_bytes=12_500_000,
            create_time=stamp(NOW - 100 + created),
            **fields,
        )

    text = snapshot_table(
        [
            snapshot("child", "root", 2),
            snapshot("root"),
            snapshot("other", "gone", 1),
            snapshot("grandchild", "child", 3),
        ],
        header=False,
        now=NOW,
    )
    assert [line[: line.index("sbx-1")].rstrip() for line in text.splitlines()] == [
        "root",
        "└─ child",
        "   └─ grandchild",
        "other",  # its parent is not listed: a root of its own
    ]
    assert "12.5MB" in text and "never" in text


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ()


@pytest.mark.parametrize(
    "error, line, status",
    [
        (
            SandboxNotFound("sandbox x does not exist", code="NOT_FOUND", metadata={"sandbox": "sandboxes/x"}),
            "NOT_FOUND: sandbox x does not exist",
            2,
        ),
        (
            SandboxNotFound("no such thing", code="NOT_FOUND", metadata={"sandbox": "sandboxes/x"}),
            "NOT_FOUND: no such thing (sandbox x)",
            2,
        ),
        (
            SnapshotNotFound("gone", code="NOT_FOUND", metadata={"snapshot": "snapshots/s"}),
            "NOT_FOUND: gone (snapshot s)",
            2,
        ),
        (
            InvalidArgumentError("timeout must be\nbetween", code="INVALID_ARGUMENT"),
            "INVALID_ARGUMENT: timeout must be between",
            1,
        ),
        (
            FakeRpcError(grpc.StatusCode.NOT_FOUND, "node nowhere does not exist"),
            "NOT_FOUND: node nowhere does not exist",
            2,
        ),
        (FileNotFoundError(2, "No such file or directory", "data.csv"), "No such file or directory: data.csv", 1),
        (
            CliError("exactly one side of cp must be SANDBOX:/absolute/path"),
            "exactly one side of cp must be SANDBOX:/absolute/path",
            2,
        ),
        (ValueError("boom"), "internal error: ValueError: boom (run with --debug for the traceback)", 1),
    ],
)
def test_errors_are_one_line_with_the_status_and_what_is_missing(error, line, status):
    assert error_line(error) == line
    assert exit_status(error) == status


def test_an_unreachable_gateway_is_said_so():
    error = SandboxError("failed to connect to all addresses; last error: ...", code="UNAVAILABLE")
    assert error_line(error, "127.0.0.1:1").startswith("UNAVAILABLE: cannot reach the gateway at 127.0.0.1:1")


def test_for_each_goes_on_after_a_failure_and_summarizes(capsys):
    def action(name: str) -> str:
        if name.startswith("missing"):
            raise SandboxNotFound(f"sandbox {name} does not exist", code="NOT_FOUND")
        if name == "busy":
            raise SandboxError("sandbox busy is CREATING", code="FAILED_PRECONDITION")
        return f"deleted {name}"

    assert for_each(["a", "missing-1", "b"], action, "rm") == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == ["deleted a", "deleted b"]
    assert err.splitlines() == [
        "mvm: rm missing-1: NOT_FOUND: sandbox missing-1 does not exist",
        "mvm: rm: 1 of 3 sandboxes failed",
    ]
    assert for_each(["missing-2", "busy"], action, "rm") == 1  # not every failure was NOT_FOUND
    assert for_each(["a"], action, "rm") == 0


def test_a_command_without_a_key_fails_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MVM_API_KEY", raising=False)
    monkeypatch.setenv("MVM_STATE_DIR", str(tmp_path))
    assert run(["ls"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mvm: no API key") and len(err.splitlines()) == 1
