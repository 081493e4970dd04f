"""MicroVM Sandbox SDK: disposable microVMs for AI agents, async (`AsyncSandbox`) and sync (`Sandbox`).

    from microvm_sandbox import Sandbox

    with Sandbox.create(envs={"MODE": "test"}) as sb:
        print(sb.run_script("python", "print(6*7)").stdout)   # a fresh interpreter, once

    with Sandbox.create("code-interpreter") as sb:             # a kernel that keeps state: microvm_sandbox.code
        sb.run_code("x = 41")
        print(sb.run_code("x + 1").text)                        # 42

    with Sandbox.create("desktop") as sb:                      # computer use: microvm_sandbox.desktop
        sb.desktop.left_click(100, 200)
        png = sb.desktop.screenshot()

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
from microvm_sandbox.code_models import CodeContext, Execution, ExecutionError, Logs, Result
from microvm_sandbox.commands import AsyncCommandHandle, ProcessInfo
from microvm_sandbox.commands_sync import CommandHandle
from microvm_sandbox.desktop import AsyncDesktop, AsyncRecording
from microvm_sandbox.desktop_models import RecordingInfo, Window
from microvm_sandbox.desktop_sync import Desktop, Recording
from microvm_sandbox.errors import (
    AuthenticationError,
    CodeContextNotFound,
    CodeInterpreterMissing,
    CommandNotFound,
    ConflictError,
    DataLossError,
    DeadlineExceededError,
    DesktopMissing,
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
    UnknownKey,
    WindowNotFound,
)
from microvm_sandbox.events import AsyncEvents, AsyncEventStream, SandboxEvent
from microvm_sandbox.events_sync import Events, EventStream, Webhooks
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
from microvm_sandbox.port_forward import AsyncPortForward
from microvm_sandbox.port_forward_sync import PortForward
from microvm_sandbox.sandbox_metrics import ResourceUsage, SandboxUsage
from microvm_sandbox.sync import Client, ExecStream, Sandbox, Snapshot
from microvm_sandbox.template import Template
from microvm_sandbox.templates import AsyncBuildStream, AsyncTemplates, BuildProgress
from microvm_sandbox.templates_sync import BuildStream, Templates
from microvm_sandbox.terminal import AsyncPtyHandle, PtyHandle
from microvm_sandbox.webhooks import AsyncWebhooks, WebhookDelivery, WebhookInfo, verify_signature

__all__ = [
    "AsyncEvents",
    "AsyncEventStream",
    "AsyncWebhooks",
    "EventStream",
    "Events",
    "SandboxEvent",
    "WebhookDelivery",
    "WebhookInfo",
    "Webhooks",
    "verify_signature",
    "ResourceUsage",
    "SandboxUsage",
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
    "AsyncDesktop",
    "AsyncRecording",
    "AsyncCommandHandle",
    "AsyncExecStream",
    "AsyncPortForward",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AuthenticationError",
    "Client",
    "CodeContext",
    "CodeContextNotFound",
    "CodeInterpreterMissing",
    "CommandHandle",
    "CommandNotFound",
    "ConflictError",
    "ConsoleOutput",
    "DataLossError",
    "DeadlineExceededError",
    "Desktop",
    "DesktopMissing",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "Execution",
    "ExecutionError",
    "Exited",
    "FailedPreconditionError",
    "FileEntry",
    "InvalidArgumentError",
    "Logs",
    "NotFoundError",
    "PermissionDeniedError",
    "ProcessInfo",
    "PortForward",
    "ProcessNotFound",
    "PtyHandle",
    "QuotaExceededError",
    "Recording",
    "RecordingInfo",
    "RateLimitedError",
    "Result",
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
    "UnknownKey",
    "Window",
    "WindowNotFound",
    "egress_policy",
]
