"""SandboxPlacement: which node gets a new sandbox, decided and recorded in one etcd transaction.

Nodes are filtered (alive, schedulable, the template built there, the caller's node selector matches its labels,
room for the sandbox) and scored: free memory and vCPUs, fewer sandboxes, the template's snapshot already on
the node (a restore instead of a boot), and fewer of the same tenant's sandboxes (spreading a tenant over the
cluster). The sandbox record naming the node is written in the same transaction as that node's placement guard,
compared against the revision read with the view: two gateways deciding at once cannot both fill a node from
the same view; the loser decides again on a fresh view.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from microvm.types.v1 import auth_pb2 as auth_types
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common import deadlines
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.records import (
    NODE_CONTROLS,
    NODES,
    PLACEMENTS,
    QUOTA_USAGE,
    SANDBOXES,
    TENANT_GUARDS,
    TENANTS,
    Every,
    Records,
)
from services.gateway.nodes import ClusterNodes, NodeView, holds_capacity
from services.gateway.records import SandboxRecord, image_of, name_of

log = structlog.get_logger()
ATTEMPTS = 20


def has_image(view: NodeView, record: SandboxRecord) -> bool:
    return image_of(record) in view.record.templates


def can_run(view: NodeView, record: SandboxRecord) -> bool:
    """The node has the sandbox's image, or can fetch it: a user template's image (`u-...`) is offered through the
    snapshot stores, and any node with the default image's kernel can install it."""
    return has_image(view, record) or (image_of(record).startswith("u-") and "default" in view.record.templates)


def score(view: NodeView, record: SandboxRecord) -> float:
    """Higher is better. Every term is a fraction, so no node wins on one term alone by sheer size."""
    capacity = view.record.capacity
    free_memory = view.memory_mib_free / capacity.memory_mib if capacity.memory_mib else 0.0
    free_vcpus = view.vcpus_free / capacity.vcpus if capacity.vcpus else 0.0
    warm = any(
        t.template == image_of(record) and t.vcpus == record.vcpus and t.memory_mib == record.memory_mib
        for t in view.record.template_snapshots
    )
    tenant_share = sum(1 for s in view.sandboxes if s.tenant == record.tenant) / (1 + len(view.sandboxes))
    local = 0.0 if has_image(view, record) else -0.6  # fetching the image first costs a copy and a cold boot
    return (
        1.0 * free_memory
        + 0.5 * free_vcpus
        + (0.4 if warm else 0.0)
        - 0.3 * tenant_share
        - 0.01 * len(view.sandboxes)
        + local
    )


def choose(views: dict[str, NodeView], record: SandboxRecord, only_node: str = "") -> str:
    """The best node for `record` (`only_node`: that one or none), or the status that says why there is none."""
    alive = [v for v in views.values() if v.alive and (not only_node or v.name == only_node)]
    if not alive:
        raise Unavailable("no compute node is answering", reason="NO_COMPUTE_NODES")
    with_template = [v for v in alive if can_run(v, record)]
    if not with_template:
        raise NotFound(
            f"template {record.template!r} is not built on any compute node",
            reason="TEMPLATE_NOT_FOUND",
            metadata={"template": record.template},
        )
    max_vcpus = max(v.record.capacity.max_vcpus_per_vm for v in with_template)
    max_memory = max(v.record.capacity.max_memory_mib_per_vm for v in with_template)
    if record.vcpus > max_vcpus:
        raise InvalidArgument(
            f"vcpus must be between 1 and {max_vcpus}, got {record.vcpus}", reason="VCPUS_OUT_OF_RANGE"
        )
    if record.memory_mib > max_memory:
        raise InvalidArgument(
            f"memory_mib must be between 128 and {max_memory}, got {record.memory_mib}", reason="MEMORY_OUT_OF_RANGE"
        )
    matching = [
        v for v in with_template if all(v.record.labels.get(k) == val for k, val in record.node_selector.items())
    ]
    if not matching:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(record.node_selector.items()))
        raise FailedPrecondition(
            f"no node with template {record.template!r} has the labels {wanted}", reason="NO_MATCHING_NODE"
        )
    schedulable = [v for v in matching if v.schedulable]
    if not schedulable:
        raise FailedPrecondition(
            "every node that could take the sandbox is cordoned or draining", reason="NO_SCHEDULABLE_NODE"
        )
    fitting = [
        v
        for v in schedulable
        if v.vcpus_free >= record.vcpus
        and v.memory_mib_free >= record.memory_mib
        and v.record.capacity.max_vcpus_per_vm >= record.vcpus
        and v.record.capacity.max_memory_mib_per_vm >= record.memory_mib
    ]
    if not fitting:
        raise ResourceExhausted(
            f"no node has {record.vcpus} vCPUs and {record.memory_mib} MiB free", reason="NO_CAPACITY"
        )
    return max(fitting, key=lambda v: (score(v, record), v.name)).name


def check_quota(
    record: SandboxRecord, tenants_sandboxes: list[SandboxRecord], quota: auth_types.Quota, snapshot_bytes: int = 0
) -> None:
    """RESOURCE_EXHAUSTED when one more sandbox like `record` would exceed the tenant's limits (0: unlimited).
    Every record counts as a sandbox; all but FAILED ones count their vCPUs, memory and disk; the disk quota also
    counts the tenant's `snapshot_bytes`."""
    holding = [s for s in tenants_sandboxes if holds_capacity(s)]
    wanted = {
        "sandboxes": (len(tenants_sandboxes) + 1, quota.max_sandboxes),
        "vcpus": (sum(s.vcpus for s in holding) + record.vcpus, quota.max_vcpus),
        "memory_mib": (sum(s.memory_mib for s in holding) + record.memory_mib, quota.max_memory_mib),
        "disk_bytes": (sum(s.disk_bytes for s in holding) + snapshot_bytes + record.disk_bytes, quota.max_disk_bytes),
    }
    for field, (after, limit) in wanted.items():
        if limit and after > limit:
            raise ResourceExhausted(
                f"tenant {record.tenant} quota exceeded: {field} would be {after} of {limit}",
                reason="QUOTA_EXCEEDED",
                metadata={"tenant": record.tenant, "resource": field, "limit": str(limit)},
            )


class SandboxPlacement:
    def __init__(self, nodes: ClusterNodes) -> None:
        self.nodes = nodes
        self.records = Records(nodes.context.etcd)
        # Seconds each decision took (view, choice and transaction), for the benchmark.
        self.timings: list[float] = []
        self._deciding = asyncio.Lock()
        self.compute_wait = deadlines.RESTART_WAIT

    async def fits(self, node: str, record: SandboxRecord, count: int) -> bool:
        """Whether `node` could take `count` more sandboxes like `record` now: a hint (a placement decides)."""
        stored, controls, nodes = await self.records.get_many(Every(SANDBOXES), Every(NODE_CONTROLS), Every(NODES))
        views = self.nodes.holding(self.nodes.registered_from(controls, nodes), [s.message for s in stored])
        view = views.get(node)
        return bool(
            view
            and view.alive
            and view.schedulable
            and can_run(view, record)
            and all(view.record.labels.get(k) == v for k, v in record.node_selector.items())
            and view.vcpus_free >= count * record.vcpus
            and view.memory_mib_free >= count * record.memory_mib
        )

    async def place(self, record: SandboxRecord, only_node: str = "") -> int:
        """Chooses a node for a new sandbox (`only_node`: that one or none) and creates its record naming that node,
        in one transaction with the node's and the tenant's guards: neither a node's capacity nor the tenant's quota
        can be exceeded by any number of concurrent creates. Returns the record's revision."""
        await self.nodes.until_any_compute(self.compute_wait)
        for _ in range(ATTEMPTS):
            # One decision at a time in this gateway: a burst of creates would otherwise read the same view, and
            # all but one would lose the transaction and decide again (n² attempts). Other gateways still contend
            # through the guards.
            async with self._deciding:
                placed, revision = await self._attempt(record, only_node)
            if placed:
                return revision
            if await self.records.get(SANDBOXES, record.id) is not None:
                raise AlreadyExists(
                    f"sandbox {name_of(record)} already exists",
                    reason="SANDBOX_EXISTS",
                    metadata={"sandbox": f"sandboxes/{name_of(record)}"},
                )
            log.info("placement_contended", sandbox=record.id, node=record.node)
        raise Aborted("placement is too contended right now; retry", reason="PLACEMENT_CONTENDED")

    async def _attempt(self, record: SandboxRecord, only_node: str = "") -> tuple[bool, int]:
        """One decision and its transaction: (placed, the record's revision)."""
        started = time.perf_counter()
        # The guards and what they guard, read together as of one revision: a placement made after this read
        # changes a guard, and our transaction then fails. Snapshots share the disk quota; their usage is auth's
        # record, compared below like our own guards.
        tenant, placements, tenant_guard, usage, stored, controls, nodes = await self.records.get_many(
            (TENANTS, (record.tenant,)),
            Every(PLACEMENTS),
            (TENANT_GUARDS, (record.tenant,)),
            (QUOTA_USAGE, (record.tenant,)),
            Every(SANDBOXES),
            Every(NODE_CONTROLS),
            Every(NODES),
        )
        quota = tenant.message.quota if tenant else auth_types.Quota()  # no tenant record: no limits
        guards = {s.parts[0]: s.revision for s in placements}
        snapshot_bytes = usage.message.used.snapshot_bytes if usage else 0
        sandboxes = [s.message for s in stored]
        tenants = [s for s in sandboxes if s.tenant == record.tenant]
        views = self.nodes.holding(self.nodes.registered_from(controls, nodes), sandboxes)
        try:  # a request no node could ever take is INVALID_ARGUMENT whatever the quota
            node = choose(views, record, only_node)
        except ResourceExhausted:
            check_quota(record, tenants, quota, snapshot_bytes)  # the tenant's own limit is the clearer answer
            raise
        record.disk_bytes = max(v.record.template_disk_bytes.get(image_of(record), 0) for v in views.values())
        check_quota(record, tenants, quota, snapshot_bytes)
        record.node = node
        guard = sandbox_types.PlacementGuard(last_sandbox_id=record.id)
        guard.time.GetCurrentTime()
        record.update_time.GetCurrentTime()
        revision = await self.records.commit(
            [
                self.records.unchanged(SANDBOXES, 0, record.id),
                self.records.unchanged(PLACEMENTS, guards.get(node, 0), node),
                self.records.unchanged(TENANT_GUARDS, tenant_guard.revision if tenant_guard else 0, record.tenant),
                self.records.unchanged(QUOTA_USAGE, usage.revision if usage else 0, record.tenant),
            ],
            [
                self.records.put_op(SANDBOXES, record, record.id),
                self.records.put_op(PLACEMENTS, guard, node),
                self.records.put_op(TENANT_GUARDS, guard, record.tenant),
            ],
        )
        self.timings.append(time.perf_counter() - started)
        return bool(revision), revision

    async def move(self, record: SandboxRecord, revision: int, target: str) -> bool:
        """Records that `record` now runs on `target` (a migration), if neither it nor the target's placements
        changed since they were read."""
        guards = {s.parts[0]: s.revision for s in await self.records.list(PLACEMENTS)}
        record.node = target
        guard = sandbox_types.PlacementGuard(last_sandbox_id=record.id)
        guard.time.GetCurrentTime()
        record.update_time.GetCurrentTime()
        return await self.records.transaction(
            compare=[
                self.records.unchanged(SANDBOXES, revision, record.id),
                self.records.unchanged(PLACEMENTS, guards.get(target, 0), target),
            ],
            success=[self.records.put_op(SANDBOXES, record, record.id), self.records.put_op(PLACEMENTS, guard, target)],
        )
