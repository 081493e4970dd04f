"""Deadlines of calls between services, named by the kind of call, in one place (seconds).

Every await on the network has one. A caller's own deadline (the public call's) is passed on instead where it
is shorter: see `within`.
"""

from __future__ import annotations

# Looking something up or recording it: auth checks, record reads, small updates.
QUICK = 5.0
# A control call that changes state but moves no VM: quotas, audit, cordon, network policy, port exposure.
CONTROL = 10.0
# A call to a guest's agent on behalf of compute: identity, network configuration, a short command.
GUEST = 30.0
# A VM changing state in place: pause, resume, stop, delete.
VM_CHANGE = 60.0
# A VM coming to life: cold boot (bounded by compute.boot_timeout_seconds), template or snapshot restore.
VM_START = 300.0
# Freezing a VM into the snapshot store, or checking every chunk of a snapshot.
SNAPSHOT = 600.0
# Moving snapshot artifacts or chunks between a node's compute and stores.
TRANSFER = 600.0
# An HTTP/JSON request turned into a call on the gateway's own gRPC port: as long as the slowest public call
# (a restore of a large snapshot); a streamed one (exec output, a file) as long as a long-running process.
PUBLIC_CALL = 600.0
PUBLIC_STREAM = 3600.0
# How long a call that could not reach a restarting instance is retried on its successor.
RESTART_WAIT = 10.0


def within(kind: float, remaining: float | None) -> float:
    """`kind`, or the caller's remaining time when that is shorter (None: the caller set no deadline)."""
    return kind if remaining is None else max(0.0, min(kind, remaining))
