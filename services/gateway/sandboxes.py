"""Sandboxes: the standard methods on sandboxes (create, get, list, update, delete), pause and resume, and the
expiry reaper (exposed ports are in exposed_ports.py). The control plane: each call is translated into calls on
the sandbox's node."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import structlog
from opentelemetry import trace

from microvm.compute.v1 import compute_pb2
from microvm.network.v1 import network_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import vm_pb2
from services.common import deadlines
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from services.common.records import SANDBOXES
from services.common.validation import check_env, check_page_size
from services.gateway.access import current_tenant
from services.gateway.nodes import ClusterNodes
from services.gateway.placement import SandboxPlacement
from services.gateway.quotas import QuotaClient
from services.gateway.records import (
    RUNNING,
    SandboxRecord,
    SandboxStore,
    convert,
    image_of,
    name_of,
    sandbox_key,
    state_name,
    to_public,
)
from services.gateway.sandbox_requests import (
    SANDBOX_ID,
    parse_filter,
    parse_name,
    snake_case,
    validate_labels,
)
from services.gateway.template_store import TemplateStore
from services.network.policy import normalized_policy

log = structlog.get_logger()
# Spans of a create's own steps: a warm create's budget is tens of milliseconds (bench/breakdown.py).
TRACER = trace.get_tracer("microvm.gateway")
DEFAULT_VCPUS, DEFAULT_MEMORY_MIB = 1, 256
UPDATABLE = ("labels", "timeout", "network_policy")
StartVm = Callable[[str], Awaitable[vm_pb2.VmRecord]]
CREATING = sandbox_types.SANDBOX_RECORD_STATE_CREATING
DELETING = sandbox_types.SANDBOX_RECORD_STATE_DELETING
LIVE = {CREATING, RUNNING, sandbox_types.SANDBOX_RECORD_STATE_PAUSED, sandbox_types.SANDBOX_RECORD_STATE_MIGRATING}


def mark_running(current: SandboxRecord, vm: vm_pb2.VmRecord) -> None:
    """A created sandbox's record once its VM runs."""
    current.state = RUNNING
    current.hypervisor, current.ip_address = f"{vm.vmm}/{vm.accel}", vm.nic.guest_cidr.partition("/")[0]


class Sandboxes:
    def __init__(
        self,
        context,
        store: SandboxStore,
        nodes: ClusterNodes,
        placement: SandboxPlacement,
        quotas: QuotaClient,
        templates: TemplateStore | None = None,
    ) -> None:
        self.context, self.settings = context, context.settings
        self.store, self.nodes, self.placement, self.quotas = store, nodes, placement, quotas
        self.templates = templates

    async def view(self, record: SandboxRecord) -> sandbox_pb2.Sandbox:
        vm, incident = await asyncio.gather(self.store.vm(record), self.store.incident(record))
        return to_public(record, vm, self.nodes.alive(record.node), incident)

    async def read(self, name: str) -> tuple[SandboxRecord, sandbox_pb2.Sandbox]:
        """The caller's sandbox `name`: its record and its public view (one etcd round trip once its node is known)."""
        record, vm, incident = await self.store.with_vm(parse_name(name))
        return record, to_public(record, vm, self.nodes.alive(record.node), incident)

    async def running(self, name: str) -> SandboxRecord:
        """The caller's sandbox, FAILED_PRECONDITION unless it runs (UNAVAILABLE when its node is lost)."""
        record, sandbox = await self.read(name)
        if sandbox.state == sandbox_pb2.SANDBOX_STATE_UNAVAILABLE:
            raise Unavailable(
                f"sandbox {name_of(record)}: {sandbox.failure_message}",
                reason="NODE_UNAVAILABLE",
                metadata={"sandbox": sandbox.name, "node": record.node},
            )
        if sandbox.state != sandbox_pb2.SANDBOX_STATE_RUNNING:
            raise FailedPrecondition(
                f"sandbox {name_of(record)} is {state_name(sandbox.state)}"
                + (f": {sandbox.failure_message}" if sandbox.failure_message else ""),
                reason="SANDBOX_NOT_RUNNING",
                metadata={"sandbox": sandbox.name},
            )
        return record

    def timeout_seconds(self, duration) -> int:
        if duration is None or (duration.seconds == 0 and duration.nanos == 0):
            return self.settings.default_timeout_seconds
        if duration.seconds < 0 or duration.nanos < 0:
            raise InvalidArgument("timeout must not be negative", reason="TIMEOUT_OUT_OF_RANGE")
        seconds = duration.seconds + (1 if duration.nanos else 0)
        if not 1 <= seconds <= self.settings.max_timeout_seconds:
            raise InvalidArgument(
                f"timeout must be between 1 s and {self.settings.max_timeout_seconds} s, got {seconds} s",
                reason="TIMEOUT_OUT_OF_RANGE",
            )
        return seconds

    def checked_policy(self, policy: sandbox_pb2.NetworkPolicy) -> network_types.NetworkPolicy:
        """The caller's egress policy, validated and normalized (UNSPECIFIED becomes NONE)."""
        policy = normalized_policy(convert(policy, network_types.NetworkPolicy))
        if not self.context.common.networking and policy.egress != network_types.EGRESS_MODE_NONE:
            raise FailedPrecondition(
                "this installation runs without networking (networking: false); only egress "
                "EGRESS_MODE_NONE is possible",
                reason="NETWORKING_DISABLED",
            )
        return policy

    def new_record(
        self,
        name: str,
        template: str,
        vcpus: int,
        memory_mib: int,
        labels,
        timeout: int,
        policy: network_types.NetworkPolicy,
        node_selector=None,
        source_snapshot: str = "",
        env=None,
    ) -> SandboxRecord:
        now = time.time()
        tenant = current_tenant() or "default"
        record = SandboxRecord(
            id=sandbox_key(tenant, name),
            name=name,
            tenant=tenant,
            template=template,
            vcpus=vcpus,
            memory_mib=memory_mib,
            labels=labels,
            timeout_seconds=timeout,
            network_policy=policy,
            node_selector=node_selector or {},
            source_snapshot=source_snapshot,
            env=env or {},
            state=sandbox_types.SANDBOX_RECORD_STATE_CREATING,
            creating_gateway=self.context.instance_id,
        )
        record.create_time.FromNanoseconds(int(now * 1e9))
        record.expire_time.FromNanoseconds(int((now + timeout) * 1e9))
        return record

    async def create(self, request: api.CreateSandboxRequest) -> sandbox_pb2.Sandbox:
        wanted = request.sandbox
        sandbox_id = request.sandbox_id or f"sbx-{uuid.uuid4().hex[:12]}"
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise InvalidArgument(f"sandbox_id {sandbox_id!r} must match {SANDBOX_ID.pattern}")
        validate_labels(wanted.labels)
        validate_labels(wanted.node_selector, "node selector", most=16)
        check_env(wanted.env, "sandbox.env")
        timeout = self.timeout_seconds(wanted.timeout if wanted.HasField("timeout") else None)
        vcpus, memory = wanted.vcpus or DEFAULT_VCPUS, wanted.memory_mib or DEFAULT_MEMORY_MIB
        if vcpus < 1 or memory < 128:
            raise InvalidArgument("vcpus must be at least 1 and memory_mib at least 128")
        policy = self.checked_policy(wanted.network_policy)
        template = (wanted.template or "default").removeprefix("templates/")
        with TRACER.start_as_current_span("gateway.resolve_template"):
            resolved = await self.templates.resolve(template) if self.templates is not None else None
        config = resolved.config if resolved is not None else None
        if config is not None:  # a user template's own size, unless the caller chose one
            vcpus, memory = wanted.vcpus or config.vcpus or vcpus, wanted.memory_mib or config.memory_mib or memory
        record = self.new_record(
            sandbox_id,
            template,
            vcpus,
            memory,
            wanted.labels,
            timeout,
            policy,
            wanted.node_selector,
            env={**(config.env if config is not None else {}), **wanted.env},
        )
        if resolved is not None and resolved.build is not None:
            record.image, record.template_build = resolved.image, resolved.build.id
            record.default_cwd, record.default_user = config.workdir, config.user

        async def create_vm(node: str) -> vm_pb2.VmRecord:
            request = compute_pb2.CreateVmRequest(
                vm_id=record.id,
                template=image_of(record),
                vcpus=record.vcpus,
                memory_mib=record.memory_mib,
                hostname=sandbox_id,
                network_policy=policy,
            )
            return (await self.nodes.on_compute(node, lambda c: c.CreateVm(request, timeout=deadlines.VM_START))).vm

        return await self.start(record, create_vm)

    async def start(self, record: SandboxRecord, start_vm: StartVm, only_node: str = "") -> sandbox_pb2.Sandbox:
        """Places the sandbox (its record is created naming the node, in one transaction with the tenant's quota and
        the node's capacity; `only_node`: that node or none), starts its VM with `start_vm(node)`, marks it RUNNING
        if it still exists, and returns its view. A failure at any step removes what was made, and a sandbox deleted
        while it was being created stays deleted: its new VM goes too."""
        with TRACER.start_as_current_span("gateway.placement"):
            revision = await self.placement.place(record, only_node)
        node = record.node
        try:
            vm = await start_vm(node)
        except BaseException as failure:
            await self._delete_vm(node, record.id)
            if not await self.store.remove(record, revision) and isinstance(failure, Exception):
                # The record changed under the create: a delete took it (and its VM, which is why starting it
                # failed). That is what the caller must hear, not how the VM's start broke.
                raise self._deleted_during_create(record) from failure
            raise

        try:
            # The view's reads (the VM record, a channel incident) side by side with the write.
            with TRACER.start_as_current_span("gateway.record_running"):
                record, vm, incident = await asyncio.gather(
                    self.store.change(
                        record, functools.partial(mark_running, vm=vm), expect_states={CREATING}, revision=revision
                    ),
                    self.store.vm(record),
                    self.store.incident(record),
                )
        except ServiceError:
            finished = await self.store.records.get(SANDBOXES, record.id)
            if finished is not None and finished.message.state == RUNNING and finished.message.node == node:
                # Another gateway's upkeep finished this create, taking this one for gone (its registration had
                # lapsed): the sandbox is the caller's all the same.
                return await self.view(finished.message)
            await self._delete_vm(node, record.id)
            raise self._deleted_during_create(record) from None
        self.store.remember_node(record)  # its first command reads it in one round trip
        log.info("sandbox_started", sandbox=record.id, node=node, snapshot=record.source_snapshot)
        return to_public(record, vm, self.nodes.alive(node), incident)

    @staticmethod
    def _deleted_during_create(record: SandboxRecord) -> Aborted:
        return Aborted(
            f"sandbox {name_of(record)} was deleted while it was being created",
            reason="SANDBOX_DELETED_DURING_CREATE",
        )

    async def _delete_vm(self, node: str, vm_id: str) -> None:
        """Best effort: a VM nobody could delete is deleted by its node's orphan sweep."""
        try:
            delete = compute_pb2.DeleteVmRequest(vm_id=vm_id)
            await self.nodes.on_compute(node, lambda c: c.DeleteVm(delete, timeout=deadlines.VM_CHANGE))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("vm_delete_deferred", node=node, vm=vm_id, error=exc.details())
        except ServiceError as exc:
            log.warning("vm_delete_deferred", node=node, vm=vm_id, error=exc.message)

    async def get(self, name: str) -> sandbox_pb2.Sandbox:
        return (await self.read(name))[1]

    async def list(self, request: api.ListSandboxesRequest) -> api.ListSandboxesResponse:
        page_size = check_page_size(request.page_size)
        wanted = parse_filter(request.filter)
        records = sorted(await self.store.list(), key=lambda r: (-r.create_time.ToNanoseconds(), r.id))
        records = [r for r in records if all(r.labels.get(k) == v for k, v in wanted.items())]
        if request.page_token:
            try:
                after = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
                key = (-int(after[0]), after[1])
            except Exception:
                raise InvalidArgument("page_token is not one this server issued") from None
            records = [r for r in records if (-r.create_time.ToNanoseconds(), r.id) > key]
        page = records[:page_size]
        token = ""
        if len(records) > page_size:
            last = page[-1]
            token = base64.urlsafe_b64encode(json.dumps([last.create_time.ToNanoseconds(), last.id]).encode()).decode()
        vms, incidents = await asyncio.gather(self.store.vms(), self.store.incidents()) if page else ({}, {})
        return api.ListSandboxesResponse(
            sandboxes=[
                to_public(r, vms.get((r.node, r.id)), self.nodes.alive(r.node), incidents.get((r.node, r.id)))
                for r in page
            ],
            next_page_token=token,
        )

    async def update(self, request: api.UpdateSandboxRequest) -> sandbox_pb2.Sandbox:
        record = await self.store.get(parse_name(request.sandbox.name))
        # Paths as proto names (`network_policy`) or as their JSON names (`networkPolicy`): a FieldMask written
        # as an object in JSON (`{"paths": [...]}`) keeps what the caller typed.
        paths = [snake_case(path) for path in request.update_mask.paths] or ["labels", "timeout"]
        for path in paths:
            if path not in UPDATABLE:
                raise InvalidArgument(f"field {path!r} cannot be updated; updatable: {', '.join(UPDATABLE)}")
        policy = self.checked_policy(request.sandbox.network_policy) if "network_policy" in paths else None
        if "labels" in paths:
            validate_labels(request.sandbox.labels)
        timeout = (
            self.timeout_seconds(request.sandbox.timeout)
            if "timeout" in paths and request.sandbox.HasField("timeout")
            else None
        )
        if policy is not None:
            await self.require_running_or_paused(record)
            if self.context.common.networking:
                change = network_pb2.SetEgressPolicyRequest(sandbox_id=record.id, policy=policy)
                await self.nodes.on_network(record.node, lambda n: n.SetEgressPolicy(change, timeout=deadlines.CONTROL))

        def apply(current: SandboxRecord) -> None:
            if policy is not None:
                current.network_policy.CopyFrom(policy)
            if "labels" in paths:
                current.labels.clear()
                current.labels.update(request.sandbox.labels)
            if timeout is not None:
                current.timeout_seconds = timeout
                current.expire_time.FromNanoseconds(int((time.time() + timeout) * 1e9))

        return await self.view(await self.store.change(record, apply, expect_states=LIVE))

    async def require_running_or_paused(self, record: SandboxRecord, reason: str = "SANDBOX_NOT_RUNNING") -> None:
        """FAILED_PRECONDITION (`reason`) unless the sandbox, as its VM says, is running or paused."""
        sandbox = await self.view(record)
        if sandbox.state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED):
            raise FailedPrecondition(
                f"sandbox {name_of(record)} is {state_name(sandbox.state)}",
                reason=reason,
                metadata={"sandbox": sandbox.name},
            )

    async def set_paused(self, name: str, paused: bool) -> sandbox_pb2.Sandbox:
        record = await self.store.get(parse_name(name))
        await self.require_running_or_paused(record, "SANDBOX_NOT_RUNNING" if paused else "SANDBOX_NOT_PAUSED")
        if paused:
            change = compute_pb2.PauseVmRequest(vm_id=record.id)
            await self.nodes.on_compute(record.node, lambda c: c.PauseVm(change, timeout=deadlines.VM_CHANGE))
        else:
            change = compute_pb2.ResumeVmRequest(vm_id=record.id)
            await self.nodes.on_compute(record.node, lambda c: c.ResumeVm(change, timeout=deadlines.VM_CHANGE))
        wanted = sandbox_types.SANDBOX_RECORD_STATE_PAUSED if paused else RUNNING
        record = await self.store.change(
            record,
            lambda current: setattr(current, "state", wanted),
            expect_states={RUNNING, sandbox_types.SANDBOX_RECORD_STATE_PAUSED},
        )
        return await self.view(record)

    async def delete(self, name: str) -> None:
        await self.destroy(await self.store.get(parse_name(name)))

    async def destroy(self, record: SandboxRecord, ended: str = "deleted") -> None:
        """Frees everything a sandbox holds; the record goes last (deleting it releases the tenant's quota), so a
        failure can be retried. A sandbox whose node is lost goes all the same: that node's compute deletes the VM
        when it returns and finds no sandbox naming it (compute.orphan_grace_seconds)."""
        record = await self.store.change(record, lambda current: setattr(current, "state", DELETING))
        if record.node and not self.nodes.alive(record.node):
            log.warning("sandbox_deleted_while_its_node_is_away", sandbox=record.id, node=record.node)
        elif record.node:
            try:
                delete = compute_pb2.DeleteVmRequest(vm_id=record.id)
                await self.nodes.on_compute(record.node, lambda c: c.DeleteVm(delete, timeout=deadlines.VM_CHANGE))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        await self.store.delete(record, ended)
        log.info("sandbox_deleted", sandbox=record.id, ended=ended)
