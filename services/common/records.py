"""Every record kept in etcd: its key layout, its declared message (`microvm.types.v1`) and its one writer.

Values are serialized protobuf messages. `RecordKind` is the one typed way to read and write a prefix:
`kind.key(...)`, `kind.encode(message)`, `kind.decode(value)`, and `Records` for the etcd calls. Records
written by releases before the declared messages were JSON; `decode` still reads those (through the kind's
legacy converter) and each writer rewrites its own once at start (`Records.migrate`).
docs/etcd-keys.md documents the same table; tests/unit/test_records.py fails when the two disagree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

import structlog
from aetcd.utils import prefix_range_end
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from microvm.types.v1 import (
    auth_pb2,
    event_pb2,
    network_pb2,
    node_pb2,
    sandbox_pb2,
    service_pb2,
    snapshot_pb2,
    template_pb2,
    vm_pb2,
    webhook_pb2,
)
from services.common import legacy_records as legacy

M = TypeVar("M", bound=Message)
log = structlog.get_logger()


class RecordCorrupt(Exception):
    """A value under a declared prefix is neither the declared message nor a known legacy form."""


PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class RecordKind(Generic[M]):
    """One key layout, e.g. `/microvm/vms/{node}/{vm}`, holding `message`, written only by `writer`.

    `legacy` converts what older releases stored there (JSON, or plain text where `legacy_text`)."""

    pattern: str
    message: type[M]
    writer: str
    legacy: Callable[[Any, tuple[str, ...]], M] | None = None
    legacy_text: bool = False

    @cached_property
    def parts(self) -> tuple[str, ...]:
        return tuple(PLACEHOLDER.findall(self.pattern))

    @property
    def prefix(self) -> str:
        return self.pattern[: self.pattern.index("{")]

    def key(self, *parts: str) -> bytes:
        if len(parts) != len(self.parts) or any(not p or "/" in p for p in parts):
            raise ValueError(f"{self.pattern}: expected {len(self.parts)} parts, got {parts!r}")
        values = iter(parts)
        return PLACEHOLDER.sub(lambda _: next(values), self.pattern).encode()

    def scope(self, *parts: str) -> bytes:
        """The key prefix shared by every record whose first parts are `parts` (all of the kind when none)."""
        pieces = PLACEHOLDER.split(self.pattern)  # literal, name, literal, name, ..., literal
        text = pieces[0]
        for index, part in enumerate(parts):
            text += part + pieces[2 * index + 2]
        return text.encode()

    def parts_of(self, key: bytes) -> tuple[str, ...] | None:
        """The parts of a key of this kind; None for a key of another kind under the same prefix."""
        match = self._regex.fullmatch(key.decode(errors="replace"))
        return match.groups() if match else None

    @cached_property
    def _regex(self) -> re.Pattern:
        pieces = PLACEHOLDER.split(self.pattern)
        return re.compile("".join(re.escape(p) if i % 2 == 0 else "([^/]+)" for i, p in enumerate(pieces)))

    def encode(self, message: M) -> bytes:
        if not isinstance(message, self.message):
            raise TypeError(f"{self.pattern} holds {self.message.DESCRIPTOR.full_name}, not {type(message).__name__}")
        return message.SerializeToString(deterministic=True)

    def is_legacy(self, value: bytes) -> bool:
        """JSON (or text) from older releases. A serialized message never starts with `{` (field 15 as a group);
        a legacy text value is printable and never starts like these messages' first field (0x0a, 0x12)."""
        if value[:1] == b"{":
            return True
        return (
            self.legacy_text
            and bool(value)
            and value[0] not in (0x0A, 0x12)
            and value.isascii()
            and value.decode().isprintable()
        )

    def decode(self, value: bytes, key: bytes | None = None) -> M:
        if self.is_legacy(value):
            if self.legacy is None:
                raise RecordCorrupt(f"{self.pattern}: JSON where {self.message.DESCRIPTOR.full_name} was expected")
            try:
                data = value.decode() if self.legacy_text and value[:1] != b"{" else json.loads(value)
            except ValueError as exc:
                raise RecordCorrupt(f"{self.pattern}: unreadable legacy value: {exc}") from None
            return self.legacy(data, (self.parts_of(key) or ()) if key else ())
        try:
            return self.message.FromString(value)
        except DecodeError as exc:
            raise RecordCorrupt(f"{self.pattern}: not a {self.message.DESCRIPTOR.full_name}: {exc}") from None


SERVICES = RecordKind(
    "/microvm/services/{kind}/{instance}",
    service_pb2.ServiceRegistration,
    "every service (its own, under its lease)",
    legacy.service_registration,
)
NODE_LOCKS = RecordKind(
    "/microvm/node-locks/{node}/{kind}", node_pb2.NodeLock, "each node service (its own, under its lease)"
)
NODES = RecordKind("/microvm/nodes/{node}", node_pb2.NodeRecord, "compute of the node")
NODE_CONTROLS = RecordKind("/microvm/node-controls/{node}", node_pb2.NodeControl, "gateway")
PLACEMENTS = RecordKind("/microvm/placements/{node}", sandbox_pb2.PlacementGuard, "gateway")
TENANT_GUARDS = RecordKind("/microvm/tenant-placements/{tenant}", sandbox_pb2.PlacementGuard, "gateway")
SANDBOXES = RecordKind("/microvm/sandboxes/{sandbox}", sandbox_pb2.SandboxRecord, "gateway", legacy.sandbox)
SANDBOX_TOMBSTONES = RecordKind("/microvm/sandbox-tombstones/{sandbox}", sandbox_pb2.SandboxTombstone, "gateway")
VMS = RecordKind("/microvm/vms/{node}/{vm}", vm_pb2.VmRecord, "compute of the node", legacy.vm)
CHANNEL_INCIDENTS = RecordKind("/microvm/channel-incidents/{node}/{vm}", vm_pb2.ChannelIncident, "relay of the node")
SNAPSHOTS = RecordKind("/microvm/snapshots/{snapshot}", snapshot_pb2.SnapshotRecord, "snapshot", legacy.snapshot)
PENDING_ARTIFACTS = RecordKind(
    "/microvm/snapshot-artifacts/{snapshot}/{artifact}",
    snapshot_pb2.PendingArtifact,
    "snapshot of the node holding the chunks",
    legacy.pending_artifact,
)
QUOTA_RELEASES = RecordKind(
    "/microvm/snapshot-quota-releases/{snapshot}",
    snapshot_pb2.QuotaRelease,
    "snapshot",
    legacy.quota_release,
    legacy_text=True,
)
ADDRESSES = RecordKind(
    "/microvm/network/{node}/addresses/{address}",
    network_pb2.AddressLease,
    "network of the node",
    legacy.address_lease,
    legacy_text=True,
)
ATTACHMENTS = RecordKind(
    "/microvm/network/{node}/attachments/{sandbox}", network_pb2.Attachment, "network of the node", legacy.attachment
)
TENANTS = RecordKind("/microvm/auth/tenants/{tenant}", auth_pb2.TenantRecord, "auth", legacy.tenant)
API_KEYS = RecordKind("/microvm/auth/keys/{key}", auth_pb2.ApiKeyRecord, "auth", legacy.api_key)
SIGNING_KEYS = RecordKind("/microvm/auth/signing-keys/{kid}", auth_pb2.SigningKeyRecord, "auth", legacy.signing_key)
QUOTA_USAGE = RecordKind("/microvm/auth/usage/{tenant}", auth_pb2.QuotaUsage, "auth", legacy.quota_usage)
QUOTA_RESERVATIONS = RecordKind(
    "/microvm/auth/reservations/{tenant}/{reservation}", auth_pb2.QuotaReservation, "auth", legacy.quota_reservation
)
AUDIT_EVENTS = RecordKind("/microvm/auth/audit/{tenant}/{sequence}", auth_pb2.AuditEvent, "auth", legacy.audit_event)
AUDIT_HEADS = RecordKind("/microvm/auth/audit-head/{tenant}", auth_pb2.AuditHead, "auth", legacy.audit_head)
# A template's owner part is its tenant, or `_public` for a public template.
TEMPLATES = RecordKind("/microvm/templates/{owner}/{template}", template_pb2.TemplateRecord, "gateway")
TEMPLATE_BUILDS = RecordKind("/microvm/template-builds/{build}", template_pb2.TemplateBuildRecord, "gateway")
WEBHOOKS = RecordKind("/microvm/webhooks/{tenant}/{webhook}", webhook_pb2.WebhookRecord, "gateway")
WEBHOOK_DELIVERIES = RecordKind(
    "/microvm/webhook-deliveries/{tenant}/{webhook}", webhook_pb2.WebhookDeliveryLog, "gateway"
)
EVENT_FENCES = RecordKind(
    "/microvm/event-fences/{instance}", event_pb2.EventFence, "gateway (its own, under its registration's lease)"
)
WEBHOOK_LOCKS = RecordKind(
    "/microvm/webhook-locks/{tenant}/{webhook}", webhook_pb2.WebhookLock, "gateway (its own, under its lease)"
)

ALL_KINDS: tuple[RecordKind, ...] = (
    SERVICES,
    NODE_LOCKS,
    NODES,
    NODE_CONTROLS,
    PLACEMENTS,
    TENANT_GUARDS,
    SANDBOXES,
    SANDBOX_TOMBSTONES,
    VMS,
    CHANNEL_INCIDENTS,
    SNAPSHOTS,
    PENDING_ARTIFACTS,
    QUOTA_RELEASES,
    ADDRESSES,
    ATTACHMENTS,
    TENANTS,
    API_KEYS,
    SIGNING_KEYS,
    QUOTA_USAGE,
    QUOTA_RESERVATIONS,
    AUDIT_EVENTS,
    AUDIT_HEADS,
    TEMPLATES,
    TEMPLATE_BUILDS,
    WEBHOOKS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_LOCKS,
    EVENT_FENCES,
)


@dataclass
class Stored(Generic[M]):
    """A record as read: its key parts, message and etcd mod revision (for compare-and-swap)."""

    parts: tuple[str, ...]
    message: M
    revision: int


@dataclass(init=False)
class Every:
    """A read for `Records.get_many`: every record of `kind` under `scope`."""

    kind: RecordKind
    scope: tuple[str, ...]

    def __init__(self, kind: RecordKind, *scope: str) -> None:
        self.kind, self.scope = kind, scope


class Records:
    """Typed etcd access for the declared record kinds."""

    def __init__(self, etcd) -> None:
        self.etcd = etcd

    async def get(self, kind: RecordKind[M], *parts: str) -> Stored[M] | None:
        key = kind.key(*parts)
        result = await self.etcd.get(key)
        if result is None:
            return None
        return Stored(parts, kind.decode(result.value, key), result.mod_revision)

    async def get_many(self, *reads: tuple[RecordKind, tuple[str, ...]] | Every) -> list:
        """Several reads in one round trip, all as of one revision. Each read is (kind, key parts), answered with
        its Stored record or None, or `Every(kind, *scope)`, answered with the list `list` would give."""
        tx = self.etcd.transactions
        ops = [
            tx.get(read.kind.scope(*read.scope), prefix_range_end(read.kind.scope(*read.scope)))
            if isinstance(read, Every)
            else tx.get(read[0].key(*read[1]))
            for read in reads
        ]
        _, responses = await self.etcd.transaction(compare=[], success=ops, failure=[])
        found: list = []
        for read, kvs in zip(reads, responses, strict=True):
            if isinstance(read, Every):
                found.append(self._decoded(read.kind, [meta for _, meta in kvs]))
            elif not kvs:
                found.append(None)
            else:
                kind, parts = read
                value, meta = kvs[0]
                found.append(Stored(parts, kind.decode(value, meta.key), meta.mod_revision))
        return found

    async def list(self, kind: RecordKind[M], *scope: str) -> list[Stored[M]]:
        """Every record of `kind` under `scope`; a corrupt one is logged and skipped, never fatal."""
        return self._decoded(kind, await self.etcd.get_prefix(kind.scope(*scope)))

    @staticmethod
    def _decoded(kind: RecordKind[M], kvs) -> list[Stored[M]]:
        stored = []
        for kv in kvs:
            parts = kind.parts_of(kv.key)
            if parts is None:
                continue  # a key of another kind under the same prefix
            try:
                stored.append(Stored(parts, kind.decode(kv.value, kv.key), kv.mod_revision))
            except RecordCorrupt as exc:
                log.error("record_corrupt", key=kv.key.decode(errors="replace"), error=str(exc))
        return stored

    async def put(self, kind: RecordKind[M], message: M, *parts: str, lease=None) -> int:
        """Writes the record; the cluster's revision of the write."""
        return (await self.etcd.put(kind.key(*parts), kind.encode(message), lease=lease)).header.revision

    async def delete(self, kind: RecordKind, *parts: str) -> None:
        await self.etcd.delete(kind.key(*parts))

    # --- transactions: compare/op builders on declared kinds ------------------------------------------
    def put_op(self, kind: RecordKind[M], message: M, *parts: str, lease=None):
        return self.etcd.transactions.put(kind.key(*parts), kind.encode(message), lease)

    def delete_op(self, kind: RecordKind, *parts: str):
        return self.etcd.transactions.delete(kind.key(*parts))

    def unchanged(self, kind: RecordKind, revision: int, *parts: str):
        """Compare: the record is as it was read (revision 0: it still does not exist)."""
        tx, key = self.etcd.transactions, kind.key(*parts)
        return tx.version(key) == 0 if revision == 0 else tx.mod(key) == revision

    async def transaction(self, compare: Iterable, success: Iterable, failure: Iterable = ()) -> bool:
        ok, _ = await self.etcd.transaction(compare=list(compare), success=list(success), failure=list(failure))
        return bool(ok)

    async def commit(self, compare: Iterable, success: Iterable) -> int:
        """`success` (puts) if every comparison holds: the revision they were written at, else 0 (nothing written).
        A writer that keeps that revision can compare against it next time without reading the record again."""
        ok, responses = await self.etcd.transaction(compare=list(compare), success=list(success), failure=[])
        return responses[0].response_put.header.revision if ok else 0

    async def migrate(self, kind: RecordKind, *scope: str) -> int:
        """Rewrites this writer's legacy (JSON) records under `scope` as declared messages, each in a transaction
        that leaves a record changed meanwhile alone. Returns how many were rewritten."""
        rewritten = 0
        tx = self.etcd.transactions
        for kv in await self.etcd.get_prefix(kind.scope(*scope)):
            if not kind.is_legacy(kv.value) or kind.parts_of(kv.key) is None:
                continue
            try:
                message = kind.decode(kv.value, kv.key)
            except (RecordCorrupt, KeyError, ValueError, TypeError, json_format.ParseError) as exc:
                log.error("record_migration_failed", key=kv.key.decode(errors="replace"), error=str(exc))
                continue
            ok, _ = await self.etcd.transaction(
                compare=[tx.mod(kv.key) == kv.mod_revision], success=[tx.put(kv.key, kind.encode(message))], failure=[]
            )
            rewritten += bool(ok)
        if rewritten:
            log.info("records_migrated", prefix=kind.scope(*scope).decode(), count=rewritten)
        return rewritten
