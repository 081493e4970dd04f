"""A small exception hierarchy, mapped from the gRPC status and the ErrorInfo reason the server sends.

    SandboxError                      anything the service (or the SDK on its behalf) refused
    ├── NotFoundError                 NOT_FOUND: a path, a port mapping, ...
    │   ├── SandboxNotFound           reason SANDBOX_NOT_FOUND (`.sandbox_id` says which)
    │   ├── SnapshotNotFound          reason SNAPSHOT_NOT_FOUND (`.snapshot_id`)
    │   ├── TemplateNotFound          reason TEMPLATE_NOT_FOUND (`.template`)
    │   ├── CommandNotFound           reason COMMAND_NOT_FOUND: the program (or run_script's interpreter) is missing
    │   ├── ProcessNotFound           reason PROCESS_NOT_FOUND: no background process with that pid (`.pid`)
    │   ├── CodeContextNotFound       reason CODE_CONTEXT_NOT_FOUND: no code context with that id (`.context`)
    │   └── WindowNotFound            reason WINDOW_NOT_FOUND: no desktop window with that id
    ├── TimeoutError                  DEADLINE_EXCEEDED (also a builtin TimeoutError; alias DeadlineExceededError)
    ├── InvalidArgumentError          INVALID_ARGUMENT, OUT_OF_RANGE
    │   └── UnknownKey                reason UNKNOWN_KEY: a key name the desktop does not know (the message lists them)
    ├── PermissionDeniedError         PERMISSION_DENIED
    ├── AuthenticationError           UNAUTHENTICATED
    ├── QuotaExceededError            RESOURCE_EXHAUSTED
    │   └── RateLimitedError          reason RATE_LIMITED (`.retry_after` seconds)
    ├── UnavailableError              UNAVAILABLE (retried by the SDK for idempotent calls)
    ├── ConflictError                 ALREADY_EXISTS, ABORTED
    ├── FailedPreconditionError       FAILED_PRECONDITION (e.g. the sandbox is not running)
    │   ├── TemplateInUse             reason TEMPLATE_IN_USE: delete(force=True) deletes it anyway
    │   ├── CodeInterpreterMissing    reason CODE_INTERPRETER_MISSING: the template has no code server (run_code)
    │   └── DesktopMissing            reason DESKTOP_MISSING: the sandbox has no display (sandbox.desktop)
    ├── DataLossError                 DATA_LOSS (a corrupt snapshot)
    ├── UnimplementedError            UNIMPLEMENTED
    └── TemplateBuildFailed           a template build ended FAILED (no status: the call itself succeeded)

Every error carries `code` (the gRPC status name), `reason` (the stable ErrorInfo reason, e.g.
`SANDBOX_NOT_FOUND`: switch on it) and `metadata` (the ErrorInfo's key/values).
"""

from __future__ import annotations

import builtins
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SandboxError(Exception):
    """Anything the service refused. `code` is the gRPC status name (e.g. `NOT_FOUND`), `reason` the stable
    ErrorInfo reason (e.g. `SANDBOX_NOT_FOUND`), `metadata` its details, `retry_after` the seconds the server
    asked to wait (RetryInfo), if any."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "UNKNOWN",
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.reason = message, code, reason
        self.metadata = metadata or {}
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(SandboxError):
    """The request was refused as malformed or out of bounds (INVALID_ARGUMENT, OUT_OF_RANGE)."""


class UnknownKey(InvalidArgumentError):
    """`desktop.press` named a key the desktop does not know; the message lists the valid names and aliases."""


class NotFoundError(SandboxError):
    """Something named by the request does not exist (NOT_FOUND): the generic one; see its subclasses."""


class SandboxNotFound(NotFoundError):
    """The sandbox does not exist (any more), or belongs to another tenant."""

    @property
    def sandbox_id(self) -> str:
        """Which sandbox, as the server named it (without `sandboxes/`); empty when it did not say."""
        return self.metadata.get("sandbox", "").removeprefix("sandboxes/")


class SnapshotNotFound(NotFoundError):
    """The snapshot does not exist (any more), or belongs to another tenant."""

    @property
    def snapshot_id(self) -> str:
        """Which snapshot (without `snapshots/`); empty when the server did not say."""
        return self.metadata.get("snapshot", "").removeprefix("snapshots/")


class TemplateNotFound(NotFoundError):
    """The template (or a build of it) does not exist, or belongs to another tenant and is not public."""

    @property
    def template(self) -> str:
        """Which template (without `templates/`); empty when the server did not say."""
        return self.metadata.get("template", "").removeprefix("templates/")


class CommandNotFound(NotFoundError):
    """The program to run is not installed in the sandbox (for `run_script`: the language's interpreter;
    `metadata` then has `language` and `interpreter`)."""


class ProcessNotFound(NotFoundError):
    """The sandbox has no background process with that pid: never started there, or ended too long ago (the
    guest keeps the last 32 that ended)."""

    @property
    def pid(self) -> int | None:
        """Which pid, when the server said (else None)."""
        text = self.metadata.get("pid") or self.message.rsplit(" ", 1)[-1]
        return int(text) if text.isdigit() else None


class CodeContextNotFound(NotFoundError):
    """The sandbox has no code context with that id: never created, or deleted (`list_code_contexts()` has them)."""

    @property
    def context(self) -> str:
        """Which context, when the server said (else empty)."""
        return self.metadata.get("context", "")


class WindowNotFound(NotFoundError):
    """The desktop has no window with that id (any more): `desktop.windows()` lists those there are."""


class ConflictError(SandboxError):
    """ALREADY_EXISTS, or ABORTED (a concurrent change won; retrying may succeed)."""


class FailedPreconditionError(SandboxError):
    """The call does not fit the current state, e.g. a sandbox that is not running."""


class TemplateInUse(FailedPreconditionError):
    """Sandboxes or snapshots use one of the template's builds: `delete(name, force=True)` deletes it anyway."""


class CodeInterpreterMissing(FailedPreconditionError):
    """The sandbox's template has no code server, so `run_code` and code contexts cannot work there: create the
    sandbox from `code-interpreter` (or a template built from it), or use `run_script` for a one-shot run."""


class DesktopMissing(FailedPreconditionError):
    """The sandbox has no display, so `sandbox.desktop` cannot work there: create it from the `desktop` template (or
    a template built from it)."""


class AuthenticationError(SandboxError):
    """No valid API key or token (UNAUTHENTICATED)."""


class PermissionDeniedError(SandboxError):
    """The caller's role does not allow this call (PERMISSION_DENIED)."""


class QuotaExceededError(SandboxError):
    """A tenant quota or a guest limit was reached (RESOURCE_EXHAUSTED)."""


class RateLimitedError(QuotaExceededError):
    """Too many calls; wait `retry_after` seconds (reason RATE_LIMITED)."""


class UnavailableError(SandboxError):
    """The gateway, the sandbox's node or its guest did not answer (UNAVAILABLE); often transient."""


class TimeoutError(SandboxError, builtins.TimeoutError):
    """A call ran past its deadline (DEADLINE_EXCEEDED). Also a builtin `TimeoutError`, so `except
    TimeoutError` catches it either way. (A process killed by its own exec timeout is not an error: its
    `ExecResult.timed_out` is true.)"""


DeadlineExceededError = TimeoutError  # the earlier name


class DataLossError(SandboxError):
    """Stored state is corrupt (a snapshot failed its integrity check: DATA_LOSS)."""


class UnimplementedError(SandboxError):
    """The server does not implement this call (UNIMPLEMENTED): an older server."""


class TemplateBuildFailed(SandboxError):
    """A template build ended FAILED. `build` is its TemplateBuild message; `reason` and `failure_reason` its
    stable reason (BUILD_STEP_FAILED, BUILD_TIMEOUT, BUILD_TOO_LARGE, BUILDER_LOST, ...), `failure_message` the
    server's words, `failed_step` the TemplateBuildStep that failed (None when no step did) and `log_tail` that
    step's newest output when the events carried it (else b""; `templates.get_build_log(name)` has the log).
    `code` is UNKNOWN: the call succeeded, the build did not."""

    def __init__(self, build: Any, failed_step: Any = None, log_tail: bytes = b"") -> None:
        self.build, self.failed_step, self.log_tail = build, failed_step, log_tail
        self.failure_reason: str = build.failure_reason or "BUILD_FAILED"
        self.failure_message: str = build.failure_message
        where = ""
        if failed_step is not None:
            where = f" at step {failed_step.index + 1} ({failed_step.text}"
            where += f", exit code {failed_step.exit_code})" if failed_step.exit_code else ")"
        message = f"template build {build.name} failed{where}: {self.failure_reason}"
        if self.failure_message:
            message += f": {self.failure_message}"
        super().__init__(message, code="UNKNOWN", reason=self.failure_reason, metadata={"build": build.name})


BY_CODE: dict[grpc.StatusCode, type[SandboxError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}
BY_REASON: dict[str, type[SandboxError]] = {
    "SANDBOX_NOT_FOUND": SandboxNotFound,
    "SNAPSHOT_NOT_FOUND": SnapshotNotFound,
    "TEMPLATE_NOT_FOUND": TemplateNotFound,
    "TEMPLATE_IN_USE": TemplateInUse,
    "COMMAND_NOT_FOUND": CommandNotFound,
    "PROCESS_NOT_FOUND": ProcessNotFound,
    "CODE_CONTEXT_NOT_FOUND": CodeContextNotFound,
    "CODE_INTERPRETER_MISSING": CodeInterpreterMissing,
    "DESKTOP_MISSING": DesktopMissing,
    "WINDOW_NOT_FOUND": WindowNotFound,
    "UNKNOWN_KEY": UnknownKey,
    "RATE_LIMITED": RateLimitedError,
}


def error_class(code: str, reason: str = "", message: str = "") -> type[SandboxError]:
    """The exception class for a status `code` (name, e.g. `NOT_FOUND`) and ErrorInfo `reason`."""
    if reason in BY_REASON:
        return BY_REASON[reason]
    if code == "NOT_FOUND" and reason in ("", "NOT_FOUND") and message.endswith(": command not found"):
        return CommandNotFound  # a server from before COMMAND_NOT_FOUND: the guest agent's own words
    status = getattr(grpc.StatusCode, code, None)
    return BY_CODE.get(status, SandboxError) if status is not None else SandboxError


def from_rpc_error(error: Any) -> SandboxError:
    """The SDK exception for a failed call (grpc.RpcError or grpc.aio.AioRpcError)."""
    code = error.code()
    reason, metadata, retry_after = "", {}, None
    try:
        status = rpc_status.from_call(error)
    except Exception:
        status = None
    for detail in status.details if status else ():
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    message = error.details() or code.name
    cls = error_class(code.name, reason, message)
    return cls(message, code=code.name, reason=reason, metadata=metadata, retry_after=retry_after)
