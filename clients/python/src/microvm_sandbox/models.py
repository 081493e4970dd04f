"""The SDK's plain data: process events and results, sandbox and snapshot descriptions, network policies.

Shared by the async (`aio`) and sync (`sync`) SDKs; nothing here talks to the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from google.protobuf import timestamp_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.errors import InvalidArgumentError

# Output a collecting call (`exec`, `commands.run`, a handle's `wait`) keeps by default: stdout and stderr together.
MAX_OUTPUT_BYTES = 16 << 20


@dataclass
class Started:
    """The process started; `pid` is its id in the guest."""

    pid: int


@dataclass
class Stdout:
    """A chunk of the process's standard output, as it was written."""

    data: bytes


@dataclass
class Stderr:
    """A chunk of the process's standard error, as it was written."""

    data: bytes


@dataclass
class Exited:
    """The process ended: `exit_code`, or `signal` when a signal killed it (then `exit_code` is None);
    `timed_out` when its exec `timeout` killed it. `truncated`: output beyond the call's `max_output_bytes` was
    dropped; `output_bytes`: what the process wrote in all, stdout and stderr (0 where the server did not count)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    truncated: bool = False
    output_bytes: int = 0


ExecEvent = Started | Stdout | Stderr | Exited


@dataclass
class ExecResult:
    """What a process printed and how it ended. `ok`: it exited 0. `truncated`: stdout and stderr do not hold all
    the process wrote (a call collects at most its `max_output_bytes`); `output_bytes`: what it wrote in all."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False
    output_bytes: int = 0

    @classmethod
    def of(cls, stdout: bytes | bytearray, stderr: bytes | bytearray, exited: Exited) -> ExecResult:
        """The result of the output collected and the process's `Exited` event."""
        output_bytes = exited.output_bytes or len(stdout) + len(stderr)
        return cls(
            bytes(stdout),
            bytes(stderr),
            exited.exit_code,
            exited.signal,
            exited.timed_out,
            exited.truncated,
            output_bytes,
        )

    @property
    def ok(self) -> bool:
        """True when the process exited with status 0."""
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """Standard output decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        """Standard error decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode(errors="replace")


@dataclass
class ConsoleOutput:
    """Bytes of a sandbox's serial console and the console offset of the first of them; a later read continues
    from `end`. With no bytes, `offset` is the one asked for."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        """The console offset just past these bytes."""
        return self.offset + len(self.data)


@dataclass
class FileEntry:
    """One entry of a directory listing."""

    path: str
    is_dir: bool
    size: int
    mode: int


def _time(stamp: timestamp_pb2.Timestamp, present: bool = True) -> datetime | None:
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)


@dataclass
class SnapshotInfo:
    """A snapshot as the server describes it: memory, devices and disk of a sandbox at one instant.
    `AsyncSnapshot` and `Snapshot` add `delete()` and `restore()`."""

    name: str
    source_sandbox: str
    parent: str
    size_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    template: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    created_at: datetime | None = None
    expires_at: datetime | None = None

    @property
    def id(self) -> str:
        """The snapshot's id (its name without `snapshots/`)."""
        return self.name.removeprefix("snapshots/")

    @classmethod
    def from_message(cls, message: sandbox_pb2.Snapshot) -> Self:
        """The description of a Snapshot message."""
        return cls(
            name=message.name,
            source_sandbox=message.source_sandbox,
            parent=message.parent_snapshot,
            size_bytes=message.size_bytes,
            labels=dict(message.labels),
            template=message.template,
            vcpus=message.vcpus,
            memory_mib=message.memory_mib,
            created_at=_time(message.create_time),
            expires_at=_time(message.expire_time, message.HasField("expire_time")),
        )


def state_name(state: int) -> str:
    """`RUNNING` for SANDBOX_STATE_RUNNING, and so on."""
    name: str = sandbox_pb2.SandboxState.Name(state)
    return name.removeprefix("SANDBOX_STATE_")


@dataclass
class SandboxInfo:
    """A sandbox as the server describes it (`get_info()`, `Sandbox.list()`). Times are UTC. `template_build`: the
    build of its template it started from (`templates/T/builds/B`; empty for a built-in template)."""

    id: str
    template: str
    state: str
    labels: dict[str, str]
    env: dict[str, str]
    started_at: datetime | None
    expires_at: datetime | None
    vcpus: int
    memory_mib: int
    node: str
    ip_address: str
    hypervisor: str = ""
    source_snapshot: str = ""
    failure_message: str = ""
    template_build: str = ""

    @property
    def name(self) -> str:
        """The resource name, `sandboxes/{id}`."""
        return f"sandboxes/{self.id}"

    @classmethod
    def from_message(cls, message: sandbox_pb2.Sandbox) -> SandboxInfo:
        """The description of a Sandbox message."""
        return cls(
            id=message.name.removeprefix("sandboxes/"),
            template=message.template,
            state=state_name(message.state),
            labels=dict(message.labels),
            env=dict(message.env) if hasattr(message, "env") else {},
            started_at=_time(message.create_time),
            expires_at=_time(message.expire_time),
            vcpus=message.vcpus,
            memory_mib=message.memory_mib,
            node=message.node,
            ip_address=message.ip_address,
            hypervisor=message.hypervisor,
            source_snapshot=message.source_snapshot.removeprefix("snapshots/"),
            failure_message=message.failure_message,
            template_build=message.template_build,
        )


EGRESS_MODES = {
    "none": sandbox_pb2.EGRESS_MODE_NONE,
    "full": sandbox_pb2.EGRESS_MODE_FULL,
    "allow-list": sandbox_pb2.EGRESS_MODE_ALLOW_LIST,
}


def egress_policy(egress: str | None = None, allow: Sequence[str] = ()) -> sandbox_pb2.NetworkPolicy:
    """A NetworkPolicy from `egress` (`none`, `full` or `allow-list`) and allow rules written `CIDR` or
    `CIDR:PORT,PORT` (e.g. `203.0.113.0/24:80,443`); rules alone mean `allow-list`."""
    mode = egress or ("allow-list" if allow else "none")
    if mode not in EGRESS_MODES:
        raise InvalidArgumentError(f"egress must be one of {', '.join(EGRESS_MODES)}, got {mode!r}")
    policy = sandbox_pb2.NetworkPolicy(egress=EGRESS_MODES[mode])
    for rule in allow:
        cidr, ports = rule, ""
        network, _, suffix = rule.partition("/")
        if ":" in suffix:  # the prefix length is followed by ports (IPv6 colons come before the slash)
            length, _, ports = suffix.partition(":")
            cidr = f"{network}/{length}"
        try:
            numbers = [int(p) for p in ports.split(",") if p]
        except ValueError:
            raise InvalidArgumentError(f"allow rule {rule!r}: ports must be numbers, e.g. 10.0.0.0/8:80,443") from None
        policy.allow.add(cidr=cidr, ports=numbers)
    return policy


def exec_event(message: api.ExecResponse) -> ExecEvent | None:
    """The SDK event of one Exec response (None for a keepalive)."""
    kind = message.WhichOneof("event")
    if kind == "started":
        return Started(message.started.pid)
    if kind == "stdout":
        return Stdout(message.stdout)
    if kind == "stderr":
        return Stderr(message.stderr)
    if kind == "exited":
        exited = message.exited
        is_signal = exited.WhichOneof("status") == "signal"
        return Exited(
            None if is_signal else exited.exit_code,
            exited.signal if is_signal else None,
            exited.timed_out,
            exited.output_truncated,
            exited.output_bytes,
        )
    return None  # keepalive
