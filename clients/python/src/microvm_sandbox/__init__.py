"""MicroVM Sandbox SDK: disposable microVMs for AI agents, async (`AsyncSandbox`) and sync (`Sandbox`)."""

from microvm_sandbox.aio import (AsyncClient, AsyncSandbox, ExecResult, Exited, FileEntry, Snapshot, Started, Stderr,
                                 egress_policy,
                                 Stdout)
from microvm_sandbox.errors import (AuthenticationError, ConflictError, DataLossError, DeadlineExceededError,
                                    FailedPreconditionError, InvalidArgumentError, NotFoundError,
                                    PermissionDeniedError, QuotaExceededError, RateLimitedError, SandboxError,
                                    UnavailableError, UnimplementedError)
from microvm_sandbox.sync import Client, Sandbox

__all__ = [
    "AsyncClient", "AsyncSandbox", "AuthenticationError", "Client", "ConflictError", "DataLossError",
    "DeadlineExceededError", "ExecResult", "Exited", "FailedPreconditionError", "FileEntry", "InvalidArgumentError",
    "NotFoundError", "PermissionDeniedError", "QuotaExceededError", "RateLimitedError", "Sandbox", "SandboxError",
    "Snapshot", "Started", "Stderr", "Stdout", "UnavailableError", "UnimplementedError", "egress_policy",
]
