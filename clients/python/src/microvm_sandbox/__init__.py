"""MicroVM Sandbox SDK: disposable microVMs for AI agents, async (`AsyncSandbox`) and sync (`Sandbox`).

    from microvm_sandbox import Sandbox

    with Sandbox.create(envs={"MODE": "test"}) as sb:
        print(sb.run_code("python", "print(6*7)").text)

Templates: `Template` describes one (a Dockerfile, an mvm.yaml recipe, or a recipe in code), `client.templates`
builds and manages them (microvm_sandbox.templates). Errors are `SandboxError` subclasses
(`microvm_sandbox.errors`); types are checked (`py.typed`).
"""

from microvm_sandbox.aio import (
    AsyncClient,
    AsyncExecStream,
    AsyncSandbox,
    AsyncSnapshot,
)
from microvm_sandbox.commands import AsyncCommandHandle, ProcessInfo
from microvm_sandbox.commands_sync import CommandHandle
from microvm_sandbox.errors import (
    AuthenticationError,
    CommandNotFound,
    ConflictError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProcessNotFound,
    QuotaExceededError,
    RateLimitedError,
    SandboxError,
    SandboxNotFound,
    SnapshotNotFound,
    TemplateBuildFailed,
    TemplateInUse,
    TemplateNotFound,
    TimeoutError,
    UnavailableError,
    UnimplementedError,
)
from microvm_sandbox.file_types import EntryInfo, FilesystemEvent, FilesystemEventType, WriteInfo
from microvm_sandbox.files import AsyncFiles, AsyncWatchHandle
from microvm_sandbox.files_sync import Files, WatchHandle
from microvm_sandbox.models import (
    ConsoleOutput,
    ExecEvent,
    ExecResult,
    Exited,
    FileEntry,
    SandboxInfo,
    SnapshotInfo,
    Started,
    Stderr,
    Stdout,
    egress_policy,
)
from microvm_sandbox.sync import Client, ExecStream, Sandbox, Snapshot
from microvm_sandbox.template import Template
from microvm_sandbox.templates import AsyncBuildStream, AsyncTemplates, BuildProgress
from microvm_sandbox.templates_sync import BuildStream, Templates
from microvm_sandbox.terminal import AsyncPtyHandle, PtyHandle

__all__ = [
    "AsyncBuildStream",
    "AsyncTemplates",
    "BuildProgress",
    "BuildStream",
    "Template",
    "TemplateBuildFailed",
    "TemplateInUse",
    "TemplateNotFound",
    "Templates",
    "WriteInfo",
    "WatchHandle",
    "FilesystemEventType",
    "FilesystemEvent",
    "Files",
    "EntryInfo",
    "AsyncWatchHandle",
    "AsyncFiles",
    "AsyncClient",
    "AsyncCommandHandle",
    "AsyncExecStream",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AuthenticationError",
    "Client",
    "CommandHandle",
    "CommandNotFound",
    "ConflictError",
    "ConsoleOutput",
    "DataLossError",
    "DeadlineExceededError",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "Exited",
    "FailedPreconditionError",
    "FileEntry",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProcessInfo",
    "ProcessNotFound",
    "PtyHandle",
    "QuotaExceededError",
    "RateLimitedError",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SandboxNotFound",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotNotFound",
    "Started",
    "Stderr",
    "Stdout",
    "TimeoutError",
    "UnavailableError",
    "UnimplementedError",
    "egress_policy",
]
