"""Who may call what: the permission matrix per public RPC, by role.

viewer    reads: Get/List sandboxes and snapshots, Stat, ListDir, ReadFile, DownloadArchive, WatchDir,
          ReadConsoleLog, ListTemplates; templates and their builds and logs; ListCodeContexts; desktop screenshots,
          GetDesktop and WaitForScreen; sandbox metrics; WatchEvents, webhooks and their deliveries.
developer everything a viewer may, plus every method that creates, changes, runs in or deletes sandboxes
          and snapshots (Create/Update/Delete, Exec, files, Pause/Resume, snapshots, restore, fork, ports, RunCode
          and code contexts, ForwardPort, desktop actions and recordings), creates and deletes webhooks, and
          creates, builds and deletes its tenant's templates (publishing a public one takes an admin).
admin     everything a developer may, plus the auth service's administrative methods (tenants, API keys,
          the audit log) and the cluster's node administration (the gateway also requires the caller's tenant to
          be one of `gateway.operator_tenants` for those: a tenant's admin is not the cluster's operator).
"""

from __future__ import annotations

from microvm.types.v1 import auth_pb2 as auth_types

SANDBOX = "/microvm.sandbox.v1.SandboxService/"
AUTH = "/microvm.auth.v1.AuthService/"
NODES = "/microvm.admin.v1.NodeService/"
TEMPLATES = "/microvm.sandbox.v1.TemplateService/"
CODE = "/microvm.sandbox.v1.CodeService/"
PORTS = "/microvm.sandbox.v1.PortForwardService/"
DESKTOP = "/microvm.sandbox.v1.DesktopService/"
METRICS = "/microvm.sandbox.v1.SandboxMetricsService/"
EVENTS = "/microvm.sandbox.v1.EventService/"
WEBHOOKS = "/microvm.sandbox.v1.WebhookService/"

READ = (
    {
        f"{SANDBOX}{m}"
        for m in (
            "GetSandbox",
            "ListSandboxes",
            "Stat",
            "ListDir",
            "ReadFile",
            "ReadConsoleLog",
            "GetSnapshot",
            "ListSnapshots",
            "DownloadArchive",
            "WatchDir",
            "ListTemplates",
            "ListProcesses",
            "ConnectProcess",
        )
    }
    | {
        f"{TEMPLATES}{m}"
        for m in ("GetTemplate", "WatchTemplateBuild", "GetTemplateBuild", "ListTemplateBuilds", "GetTemplateBuildLog")
    }
    | {f"{CODE}ListCodeContexts"}
    | {f"{DESKTOP}{m}" for m in ("Screenshot", "GetDesktop", "WaitForScreen", "CreateDesktopStream")}
    | {f"{METRICS}{m}" for m in ("GetSandboxMetrics", "ListSandboxMetrics")}
    | {f"{EVENTS}WatchEvents"}
    | {f"{WEBHOOKS}{m}" for m in ("GetWebhook", "ListWebhooks", "ListWebhookDeliveries")}
)
WRITE = (
    {
        f"{SANDBOX}{m}"
        for m in (
            "CreateSandbox",
            "UpdateSandbox",
            "DeleteSandbox",
            "Exec",
            "ExecInteractive",
            "StartProcess",
            "SendProcessInput",
            "SignalProcess",
            "WriteFile",
            "MakeDir",
            "Remove",
            "Rename",
            "UploadArchive",
            "PauseSandbox",
            "ResumeSandbox",
            "CreateSnapshot",
            "DeleteSnapshot",
            "RestoreSnapshot",
            "ForkSandbox",
            "ExposePort",
            "UnexposePort",
        )
    }
    | {
        f"{TEMPLATES}{m}"
        for m in (
            "CreateTemplate",
            "UpdateTemplate",
            "DeleteTemplate",
            "BuildTemplate",
            "AssignTemplateTags",
            "RemoveTemplateTags",
        )
    }
    | {
        f"{CODE}{m}"
        for m in ("RunCode", "CreateCodeContext", "RestartCodeContext", "DeleteCodeContext", "InterruptCode")
    }
    | {f"{PORTS}ForwardPort"}
    | {f"{DESKTOP}{m}" for m in ("DesktopAction", "StartRecording", "StopRecording")}
    | {f"{WEBHOOKS}{m}" for m in ("CreateWebhook", "DeleteWebhook")}
)
NODE_ADMIN = {f"{NODES}{m}" for m in ("ListNodes", "GetNode", "CordonNode", "UncordonNode", "DrainNode")}
ADMIN = {f"{AUTH}{m}" for m in ("CreateTenant", "CreateApiKey", "RevokeApiKey", "ListAuditEvents")} | NODE_ADMIN

MATRIX: dict[int, frozenset[str]] = {
    auth_types.ROLE_VIEWER: frozenset(READ),
    auth_types.ROLE_DEVELOPER: frozenset(READ | WRITE),
    auth_types.ROLE_ADMIN: frozenset(READ | WRITE | ADMIN),
}

# Methods whose calls are recorded in the audit log.
MUTATING = frozenset(
    WRITE
    | {f"{AUTH}{m}" for m in ("CreateTenant", "CreateApiKey", "RevokeApiKey")}
    | {f"{NODES}{m}" for m in ("CordonNode", "UncordonNode", "DrainNode")}
)


def allowed(role: int, method: str) -> bool:
    return method in MATRIX.get(role, frozenset())
