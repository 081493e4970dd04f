"""Who may call what: the permission matrix per public RPC, by role.

viewer    reads: Get/List sandboxes and snapshots, Stat, ListDir, ReadFile.
developer everything a viewer may, plus every method that creates, changes, runs in or deletes sandboxes
          and snapshots (Create/Update/Delete, Exec, files, Pause/Resume, snapshots, restore, fork, ports).
admin     everything a developer may, plus the auth service's administrative methods (tenants, API keys,
          the audit log).
"""

from __future__ import annotations

from microvm.auth.v1 import auth_pb2

SANDBOX = "/microvm.sandbox.v1.SandboxService/"
AUTH = "/microvm.auth.v1.AuthService/"

READ = {
    f"{SANDBOX}{m}"
    for m in ("GetSandbox", "ListSandboxes", "Stat", "ListDir", "ReadFile", "GetSnapshot", "ListSnapshots")
}
WRITE = {
    f"{SANDBOX}{m}"
    for m in (
        "CreateSandbox",
        "UpdateSandbox",
        "DeleteSandbox",
        "Exec",
        "ExecInteractive",
        "WriteFile",
        "MakeDir",
        "Remove",
        "PauseSandbox",
        "ResumeSandbox",
        "CreateSnapshot",
        "DeleteSnapshot",
        "RestoreSnapshot",
        "ForkSandbox",
        "ExposePort",
    )
}
ADMIN = {f"{AUTH}{m}" for m in ("CreateTenant", "CreateApiKey", "RevokeApiKey", "ListAuditEvents")}

MATRIX: dict[int, frozenset[str]] = {
    auth_pb2.ROLE_VIEWER: frozenset(READ),
    auth_pb2.ROLE_DEVELOPER: frozenset(READ | WRITE),
    auth_pb2.ROLE_ADMIN: frozenset(READ | WRITE | ADMIN),
}

# Methods whose calls are recorded in the audit log.
MUTATING = frozenset(WRITE | {f"{AUTH}{m}" for m in ("CreateTenant", "CreateApiKey", "RevokeApiKey")})


def allowed(role: int, method: str) -> bool:
    return method in MATRIX.get(role, frozenset())
