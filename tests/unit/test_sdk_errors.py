"""The SDK's error hierarchy (from real google.rpc statuses) and run_code's interpreter check (the wrapper run by
the host's own sh), without a server."""

from __future__ import annotations

import builtins
import subprocess
from dataclasses import replace

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from microvm.sandbox.v1 import sandbox_pb2
from microvm_sandbox import (
    CommandNotFound,
    ConflictError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    SandboxError,
    SandboxInfo,
    SandboxNotFound,
    SnapshotNotFound,
    TimeoutError,
    UnavailableError,
    languages,
)
from microvm_sandbox.errors import from_rpc_error
from microvm_sandbox.models import ExecResult


class StatusError(grpc.RpcError):
    """A failed call as grpc hands it to the SDK: code, details and the status in the trailers."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata=None, retry: float = 0):
        details = []
        if reason:
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="microvm.dev", metadata=metadata or {}))
            details.append(info)
        if retry:
            delay = any_pb2.Any()
            delay.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry))))
            details.append(delay)
        status = rpc_status.to_status(
            status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
        )
        self._code, self._message, self._trailers = code, message, status.trailing_metadata

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize(
    "code, reason, cls",
    [
        (grpc.StatusCode.NOT_FOUND, "SANDBOX_NOT_FOUND", SandboxNotFound),
        (grpc.StatusCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND", SnapshotNotFound),
        (grpc.StatusCode.NOT_FOUND, "COMMAND_NOT_FOUND", CommandNotFound),
        (grpc.StatusCode.NOT_FOUND, "EXPOSED_PORT_NOT_FOUND", NotFoundError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", TimeoutError),
        (grpc.StatusCode.INVALID_ARGUMENT, "TIMEOUT_OUT_OF_RANGE", InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, "", InvalidArgumentError),
        (grpc.StatusCode.PERMISSION_DENIED, "", PermissionDeniedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", QuotaExceededError),
        (grpc.StatusCode.UNAVAILABLE, "NODE_UNAVAILABLE", UnavailableError),
        (grpc.StatusCode.ALREADY_EXISTS, "", ConflictError),
        (grpc.StatusCode.INTERNAL, "", SandboxError),
    ],
)
def test_statuses_map_to_the_hierarchy(code, reason, cls):
    error = from_rpc_error(StatusError(code, "what happened", reason, {"sandbox": "sandboxes/x"}))
    assert type(error) is cls and isinstance(error, SandboxError)
    assert (error.code, error.reason, error.message, str(error)) == (
        code.name,
        reason,
        "what happened",
        "what happened",
    )


def test_a_missing_sandbox_says_which():
    error = from_rpc_error(
        StatusError(
            grpc.StatusCode.NOT_FOUND, "sandbox x does not exist", "SANDBOX_NOT_FOUND", {"sandbox": "sandboxes/x"}
        )
    )
    assert isinstance(error, NotFoundError) and error.sandbox_id == "x"
    snapshot = from_rpc_error(
        StatusError(grpc.StatusCode.NOT_FOUND, "gone", "SNAPSHOT_NOT_FOUND", {"snapshot": "snapshots/s1"})
    )
    assert snapshot.snapshot_id == "s1"


def test_rate_limits_carry_the_delay_and_timeouts_are_builtin_ones():
    limited = from_rpc_error(StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "RATE_LIMITED", retry=3))
    assert isinstance(limited, RateLimitedError) and isinstance(limited, QuotaExceededError)
    assert limited.retry_after == 3
    timeout = from_rpc_error(StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert isinstance(timeout, builtins.TimeoutError) and DeadlineExceededError is TimeoutError
    with pytest.raises(builtins.TimeoutError):
        raise timeout


def test_a_server_without_the_reason_still_gives_command_not_found():
    error = from_rpc_error(StatusError(grpc.StatusCode.NOT_FOUND, "no-such-program: command not found"))
    assert isinstance(error, CommandNotFound)


@pytest.mark.parametrize(
    "name, interpreter",
    [("python", "python3"), ("Python3", "python3"), ("py", "python3"), ("bash", "bash"), ("sh", "sh"),
     ("shell", "sh"), ("javascript", "node"), ("js", "node"), ("nodejs", "node"), ("ruby", "ruby"), ("pl", "perl")],
)  # fmt: skip
def test_languages_and_their_interpreters(name, interpreter):
    assert languages.language(name).interpreter == interpreter


def test_an_unknown_language_lists_the_known_ones():
    with pytest.raises(InvalidArgumentError, match="unsupported language 'cobol'; supported: bash, javascript, js"):
        languages.language("cobol")


def run_wrapper(lang: languages.Language, code: str) -> ExecResult:
    done = subprocess.run(languages.argv(lang, code), capture_output=True, timeout=30)
    return ExecResult(done.stdout, done.stderr, done.returncode)


def test_the_wrapper_runs_the_code_with_the_interpreter_in_one_process():
    result = languages.checked(languages.language("sh"), run_wrapper(languages.language("sh"), 'echo "$0"; exit 4'))
    assert (result.stdout, result.exit_code) == (b"sh\n", 4)  # exec'd: the interpreter's own status
    bash = languages.language("bash")
    assert languages.checked(bash, run_wrapper(bash, "echo ${BASH_VERSION:+bash}")).stdout == b"bash\n"


def test_a_missing_interpreter_is_command_not_found_naming_language_and_interpreter():
    missing = replace(languages.language("ruby"), interpreter="no-such-interpreter-here")
    result = run_wrapper(missing, "puts 1")
    assert result.exit_code == 127
    with pytest.raises(CommandNotFound) as failure:
        languages.checked(missing, result)
    assert failure.value.metadata == {"language": "ruby", "interpreter": "no-such-interpreter-here"}
    assert "ruby" in failure.value.message and "`no-such-interpreter-here` is not installed" in failure.value.message
    # The program's own exit 127 is a result, not a missing interpreter.
    sh = languages.language("sh")
    assert languages.checked(sh, run_wrapper(sh, "echo oops >&2; exit 127")).exit_code == 127


def test_sandbox_info_from_a_message():
    message = sandbox_pb2.Sandbox(
        name="sandboxes/sbx-1",
        template="default",
        state=sandbox_pb2.SANDBOX_STATE_PAUSED,
        labels={"a": "1"},
        env={"MODE": "x"},
        vcpus=2,
        memory_mib=512,
        node="n1",
        ip_address="10.0.0.2",
        create_time=timestamp_pb2.Timestamp(seconds=1_800_000_000),
        expire_time=timestamp_pb2.Timestamp(seconds=1_800_000_600),
        source_snapshot="snapshots/snap-1",
    )
    info = SandboxInfo.from_message(message)
    assert (info.id, info.name, info.state, info.labels, info.env) == (
        "sbx-1",
        "sandboxes/sbx-1",
        "PAUSED",
        {"a": "1"},
        {"MODE": "x"},
    )
    assert (info.expires_at - info.started_at).total_seconds() == 600 and info.started_at.tzinfo is not None
    assert (info.vcpus, info.memory_mib, info.node, info.ip_address, info.source_snapshot) == (
        2,
        512,
        "n1",
        "10.0.0.2",
        "snap-1",
    )
