"""CreateSandbox, GetSandbox, ListSandboxes, UpdateSandbox, DeleteSandbox, and the expiry reaper."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import grpc
import structlog

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.compute.v1 import compute_pb2
from microvm.network.v1 import network_pb2
from microvm.relay.v1 import relay_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import FailedPrecondition, InvalidArgument, ServiceError
from services.gateway.access import current_tenant
from services.gateway.records import SandboxRecord
from services.network.policy import normalized_policy

log = structlog.get_logger()
SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
DEFAULT_VCPUS, DEFAULT_MEMORY_MIB = 1, 256
UPDATABLE = ("labels", "timeout", "network_policy")


def parse_name(name: str, collection: str = "sandboxes") -> str:
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not SANDBOX_ID.match(name[len(prefix) :]):
        raise InvalidArgument(
            f"{name!r} is not a valid resource name; expected {collection}/{{id}}", reason="INVALID_NAME"
        )
    return name[len(prefix) :]


def validate_labels(labels) -> None:
    if len(labels) > 64:
        raise InvalidArgument("at most 64 labels are allowed")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise InvalidArgument(f"label key {key!r} must match {LABEL_KEY.pattern}")
        if len(value) > 63:
            raise InvalidArgument(f"label {key!r}: value longer than 63 characters")


def parse_filter(text: str) -> dict[str, str]:
    wanted = {}
    for term in text.split():
        match = re.fullmatch(r"labels\.([a-z][a-z0-9_-]*)=(.*)", term)
        if not match:
            raise InvalidArgument(f"filter term {term!r} is not of the form labels.KEY=VALUE")
        wanted[match.group(1)] = match.group(2).strip('"')
    return wanted


class SandboxLifecycle:
    """Mixin of SandboxServicer: the standard methods on sandboxes."""

    def _auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.placement.channel_to("auth"))

    async def reserve_quota(self, tenant: str, reservation_id: str, amount: auth_pb2.QuotaAmount) -> None:
        """Holds the tenant's quota for a new resource (atomic in the auth service); a no-op without auth."""
        if self.context.settings.require_auth:
            await self._auth().ReserveQuota(
                auth_pb2.ReserveQuotaRequest(tenant=tenant, reservation_id=reservation_id, amount=amount), timeout=10
            )

    async def release_quota(self, tenant: str, reservation_id: str) -> None:
        if self.context.settings.require_auth:
            try:
                await self._auth().ReleaseQuota(
                    auth_pb2.ReleaseQuotaRequest(tenant=tenant, reservation_id=reservation_id), timeout=10
                )
            except (grpc.aio.AioRpcError, ServiceError) as exc:
                log.error("quota_release_failed", tenant=tenant, reservation=reservation_id, error=str(exc))

    def _timeout_seconds(self, duration) -> int:
        settings = self.context.settings
        if duration is None or (duration.seconds == 0 and duration.nanos == 0):
            return settings.default_timeout_seconds
        seconds = duration.seconds + (1 if duration.nanos else 0)
        if not 1 <= seconds <= settings.max_timeout_seconds:
            raise InvalidArgument(
                f"timeout must be between 1 s and {settings.max_timeout_seconds} s, got {seconds} s",
                reason="TIMEOUT_OUT_OF_RANGE",
            )
        return seconds

    async def CreateSandbox(self, request, context):
        wanted = request.sandbox
        sandbox_id = request.sandbox_id or f"sbx-{uuid.uuid4().hex[:12]}"
        if not SANDBOX_ID.match(sandbox_id):
            raise InvalidArgument(f"sandbox_id {sandbox_id!r} must match {SANDBOX_ID.pattern}")
        validate_labels(wanted.labels)
        timeout = self._timeout_seconds(wanted.timeout if wanted.HasField("timeout") else None)
        template = wanted.template or "default"
        vcpus = wanted.vcpus or DEFAULT_VCPUS
        memory = wanted.memory_mib or DEFAULT_MEMORY_MIB
        if vcpus < 1 or memory < 128:
            raise InvalidArgument("vcpus must be at least 1 and memory_mib at least 128")
        policy = self.checked_policy(wanted.network_policy)
        sandbox = sandbox_pb2.Sandbox(
            template=template, vcpus=vcpus, memory_mib=memory, labels=wanted.labels, network_policy=policy
        )
        record = await self.start_sandbox(
            sandbox_id,
            sandbox,
            timeout,
            lambda compute: compute.CreateVm(
                compute_pb2.CreateVmRequest(
                    vm_id=sandbox_id,
                    template=template,
                    vcpus=vcpus,
                    memory_mib=memory,
                    hostname=sandbox_id,
                    network_policy=policy,
                ),
                timeout=self.context.settings.max_timeout_seconds,
            ),
        )
        return api.CreateSandboxResponse(sandbox=record.sandbox)

    def checked_policy(self, policy: sandbox_pb2.NetworkPolicy) -> sandbox_pb2.NetworkPolicy:
        """The caller's egress policy, validated and normalized (UNSPECIFIED becomes NONE)."""
        policy = normalized_policy(policy)
        if not self.context.common.networking and policy.egress != sandbox_pb2.EGRESS_MODE_NONE:
            raise FailedPrecondition(
                "this installation runs without networking (networking: false); only "
                "egress EGRESS_MODE_NONE is possible",
                reason="NETWORKING_DISABLED",
            )
        return policy

    async def start_sandbox(
        self, sandbox_id: str, sandbox: sandbox_pb2.Sandbox, timeout: int, start_vm
    ) -> SandboxRecord:
        """Records a new sandbox, places it, starts its VM with `start_vm(compute_stub)`, marks it RUNNING.

        A failure at any step removes the record again: nothing half-made survives."""
        now = time.time()
        sandbox.name = f"sandboxes/{sandbox_id}"
        sandbox.state = sandbox_pb2.SANDBOX_STATE_CREATING
        sandbox.create_time.FromNanoseconds(int(now * 1e9))
        sandbox.update_time.CopyFrom(sandbox.create_time)
        sandbox.expire_time.FromNanoseconds(int((now + timeout) * 1e9))
        record = SandboxRecord(
            id=sandbox_id,
            sandbox=sandbox,
            timeout_seconds=timeout,
            expire_at=now + timeout,
            tenant=current_tenant() or "default",
        )
        node = await self.placement.choose_node(sandbox.template, sandbox.vcpus, sandbox.memory_mib)
        await self.reserve_quota(
            record.tenant,
            f"sandbox-{sandbox_id}",
            auth_pb2.QuotaAmount(sandboxes=1, vcpus=sandbox.vcpus, memory_mib=sandbox.memory_mib),
        )
        try:
            await self.store.create(record)
        except BaseException:
            await self.release_quota(record.tenant, f"sandbox-{sandbox_id}")
            raise
        record.sandbox.node = node
        compute = self.placement.compute(node)
        try:
            await self.store.put(record)
            vm = (await start_vm(compute)).vm
            record.sandbox.hypervisor = f"{vm.vmm}/{vm.accel}"
            record.sandbox.ip_address = vm.ip_address
            record.agent_socket = vm.agent.socket_path
            record.agent_transport = (
                "hybrid-vsock" if vm.agent.transport == compute_pb2.AGENT_TRANSPORT_HYBRID_VSOCK else "virtio-serial"
            )
            if vm.start_method != "cold-boot":
                # Restored from a snapshot (the user's or the template's): the guest has its source's
                # host name and RNG state until it is given its own.
                await self.placement.relay().SetGuestIdentity(
                    relay_pb2.SetGuestIdentityRequest(target=self.agent_target(record), hostname=sandbox_id), timeout=30
                )
        except BaseException:
            try:
                await compute.DeleteVm(compute_pb2.DeleteVmRequest(vm_id=sandbox_id), timeout=30)
            except grpc.aio.AioRpcError:
                pass  # compute already cleaned up its side of a failed start
            await self.store.delete(record)
            await self.release_quota(record.tenant, f"sandbox-{sandbox_id}")
            raise
        record.sandbox.state = sandbox_pb2.SANDBOX_STATE_RUNNING
        await self.store.put(record)
        log.info("sandbox_started", sandbox=sandbox_id, node=node, snapshot=sandbox.source_snapshot)
        return record

    async def GetSandbox(self, request, context):
        record = await self.store.get(parse_name(request.name))
        return api.GetSandboxResponse(sandbox=record.sandbox)

    async def ListSandboxes(self, request, context):
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        page_size = min(request.page_size or 50, 1000)
        wanted = parse_filter(request.filter)
        records = sorted(await self.store.list(), key=lambda r: (-r.sandbox.create_time.ToNanoseconds(), r.id))
        records = [r for r in records if all(r.sandbox.labels.get(k) == v for k, v in wanted.items())]
        if request.page_token:
            try:
                after = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
                key = (-int(after[0]), after[1])
            except Exception:
                raise InvalidArgument("page_token is not one this server issued") from None
            records = [r for r in records if (-r.sandbox.create_time.ToNanoseconds(), r.id) > key]
        page = records[:page_size]
        token = ""
        if len(records) > page_size:
            last = page[-1]
            token = base64.urlsafe_b64encode(
                json.dumps([last.sandbox.create_time.ToNanoseconds(), last.id]).encode()
            ).decode()
        return api.ListSandboxesResponse(sandboxes=[r.sandbox for r in page], next_page_token=token)

    async def UpdateSandbox(self, request, context):
        record = await self.store.get(parse_name(request.sandbox.name))
        paths = list(request.update_mask.paths) or ["labels", "timeout"]
        for path in paths:
            if path not in UPDATABLE:
                raise InvalidArgument(f"field {path!r} cannot be updated; updatable: {', '.join(UPDATABLE)}")
        if "network_policy" in paths:
            policy = self.checked_policy(request.sandbox.network_policy)
            if record.sandbox.state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED):
                raise FailedPrecondition(
                    f"sandbox {record.id} is {sandbox_pb2.SandboxState.Name(record.sandbox.state)}",
                    reason="SANDBOX_NOT_RUNNING",
                )
            if self.context.common.networking:
                await self.placement.network(record.node).SetEgressPolicy(
                    network_pb2.SetEgressPolicyRequest(sandbox_id=record.id, policy=policy), timeout=30
                )
            record.sandbox.network_policy.CopyFrom(policy)
        if "labels" in paths:
            validate_labels(request.sandbox.labels)
            record.sandbox.labels.clear()
            record.sandbox.labels.update(request.sandbox.labels)
        if "timeout" in paths and request.sandbox.HasField("timeout"):
            record.timeout_seconds = self._timeout_seconds(request.sandbox.timeout)
            record.expire_at = time.time() + record.timeout_seconds
            record.sandbox.expire_time.FromNanoseconds(int(record.expire_at * 1e9))
        await self.store.put(record)
        return api.UpdateSandboxResponse(sandbox=record.sandbox)

    async def ExposePort(self, request, context):
        record = await self.store.get(parse_name(request.sandbox))
        if not self.context.common.networking:
            raise FailedPrecondition(
                "this installation runs without networking (networking: false)", reason="NETWORKING_DISABLED"
            )
        if record.sandbox.state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED):
            raise FailedPrecondition(
                f"sandbox {record.id} is {sandbox_pb2.SandboxState.Name(record.sandbox.state)}",
                reason="SANDBOX_NOT_RUNNING",
            )
        reply = await self.placement.network(record.node).ExposePort(
            network_pb2.ExposePortRequest(
                sandbox_id=record.id,
                guest_port=request.guest_port,
                host_address=request.host_address,
                host_port=request.host_port,
            ),
            timeout=30,
        )
        if reply.port not in record.sandbox.exposed_ports:
            record.sandbox.exposed_ports.append(reply.port)
            await self.store.put(record)
        return api.ExposePortResponse(port=reply.port)

    async def PauseSandbox(self, request, context):
        return api.PauseSandboxResponse(sandbox=await self._set_paused(request.name, True))

    async def ResumeSandbox(self, request, context):
        return api.ResumeSandboxResponse(sandbox=await self._set_paused(request.name, False))

    async def _set_paused(self, name: str, paused: bool) -> sandbox_pb2.Sandbox:
        record = await self.store.get(parse_name(name))
        if record.sandbox.state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED):
            raise FailedPrecondition(
                f"sandbox {record.id} is {sandbox_pb2.SandboxState.Name(record.sandbox.state)}",
                reason="SANDBOX_NOT_RUNNING" if paused else "SANDBOX_NOT_PAUSED",
            )
        compute = self.placement.compute(record.node)
        if paused:
            await compute.PauseVm(compute_pb2.PauseVmRequest(vm_id=record.id), timeout=30)
        else:
            await compute.ResumeVm(compute_pb2.ResumeVmRequest(vm_id=record.id), timeout=30)
        record.sandbox.state = sandbox_pb2.SANDBOX_STATE_PAUSED if paused else sandbox_pb2.SANDBOX_STATE_RUNNING
        await self.store.put(record)
        return record.sandbox

    async def DeleteSandbox(self, request, context):
        record = await self.store.get(parse_name(request.name))
        await self.destroy(record)
        return api.DeleteSandboxResponse()

    async def destroy(self, record: SandboxRecord) -> None:
        """Frees everything a sandbox holds; the record goes last so a failure can be retried."""
        record.sandbox.state = sandbox_pb2.SANDBOX_STATE_DELETING
        await self.store.put(record)
        if record.node:
            try:
                await self.placement.compute(record.node).DeleteVm(
                    compute_pb2.DeleteVmRequest(vm_id=record.id), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            try:
                await self.placement.relay().CloseChannel(relay_pb2.CloseChannelRequest(vm_id=record.id), timeout=5)
            except (grpc.aio.AioRpcError, ServiceError) as exc:
                log.info("relay_close_channel_failed", sandbox=record.id, error=str(exc))
        await self.store.delete(record)
        await self.release_quota(record.tenant, f"sandbox-{record.id}")
        log.info("sandbox_deleted", sandbox=record.id)

    async def reap_expired(self) -> None:
        """Deletes sandboxes whose timeout passed (and retries deletions that failed)."""
        now = time.time()
        for record in await self.store.list():
            if record.expire_at <= now or (
                record.sandbox.state == sandbox_pb2.SANDBOX_STATE_DELETING
                and record.sandbox.update_time.ToSeconds() < now - 30
            ):
                try:
                    await self.destroy(record)
                    log.info("sandbox_expired", sandbox=record.id)
                except (ServiceError, grpc.aio.AioRpcError) as exc:
                    log.warning("sandbox_reap_failed", sandbox=record.id, error=str(exc))
