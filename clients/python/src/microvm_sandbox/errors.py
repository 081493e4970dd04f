"""A small exception hierarchy, mapped from the gRPC status and the ErrorInfo reason the server sends."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SandboxError(Exception):
    """Anything the service refused. `reason` is the stable ErrorInfo reason (e.g. `SANDBOX_NOT_FOUND`)."""

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


class InvalidArgumentError(SandboxError): ...


class NotFoundError(SandboxError): ...


class ConflictError(SandboxError): ...


class FailedPreconditionError(SandboxError): ...


class AuthenticationError(SandboxError): ...


class PermissionDeniedError(SandboxError): ...


class QuotaExceededError(SandboxError): ...


class RateLimitedError(QuotaExceededError): ...


class UnavailableError(SandboxError): ...


class DeadlineExceededError(SandboxError): ...


class DataLossError(SandboxError): ...


class UnimplementedError(SandboxError): ...


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
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


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
    cls = RateLimitedError if reason == "RATE_LIMITED" else BY_CODE.get(code, SandboxError)
    return cls(error.details() or code.name, code=code.name, reason=reason, metadata=metadata, retry_after=retry_after)
