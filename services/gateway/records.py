"""Sandbox records: the gateway's state in etcd at `/microvm/sandboxes/<id>`.

A record holds the public Sandbox message (proto JSON) plus where the sandbox runs. The VM's own record
(`/microvm/vms/<node>/<id>`, written by compute) is read alongside, so a VM that died shows as FAILED
without anyone having to tell the gateway.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from google.protobuf import json_format

from microvm.sandbox.v1 import sandbox_pb2
from services.common.errors import AlreadyExists, NotFound
from services.gateway.access import current_tenant

SANDBOXES_PREFIX = "/microvm/sandboxes/"
VMS_PREFIX = "/microvm/vms/"
VM_STATE_TO_SANDBOX = {
    "CREATING": sandbox_pb2.SANDBOX_STATE_CREATING,
    "RUNNING": sandbox_pb2.SANDBOX_STATE_RUNNING,
    "PAUSED": sandbox_pb2.SANDBOX_STATE_PAUSED,
    "STOPPED": sandbox_pb2.SANDBOX_STATE_FAILED,
    "FAILED": sandbox_pb2.SANDBOX_STATE_FAILED,
}


@dataclass
class SandboxRecord:
    id: str
    sandbox: sandbox_pb2.Sandbox
    timeout_seconds: int
    expire_at: float
    agent_socket: str = ""
    agent_transport: str = "virtio-serial"
    tenant: str = "default"
    revision: int = field(default=0, compare=False)

    @property
    def key(self) -> bytes:
        return f"{SANDBOXES_PREFIX}{self.id}".encode()

    @property
    def node(self) -> str:
        return self.sandbox.node

    def encode(self) -> bytes:
        return json.dumps(
            {
                "sandbox": json_format.MessageToDict(self.sandbox),
                "timeout_seconds": self.timeout_seconds,
                "expire_at": self.expire_at,
                "agent_socket": self.agent_socket,
                "agent_transport": self.agent_transport,
                "tenant": self.tenant,
            }
        ).encode()

    @classmethod
    def decode(cls, sandbox_id: str, value: bytes, revision: int = 0) -> SandboxRecord:
        data = json.loads(value)
        sandbox = json_format.ParseDict(data["sandbox"], sandbox_pb2.Sandbox())
        return cls(
            id=sandbox_id,
            sandbox=sandbox,
            timeout_seconds=data["timeout_seconds"],
            expire_at=data["expire_at"],
            agent_socket=data.get("agent_socket", ""),
            agent_transport=data.get("agent_transport", "virtio-serial"),
            tenant=data.get("tenant", "default"),
            revision=revision,
        )

    def touch(self) -> None:
        self.sandbox.update_time.FromNanoseconds(time.time_ns())


class SandboxStore:
    def __init__(self, etcd) -> None:
        self.etcd = etcd

    async def create(self, record: SandboxRecord) -> None:
        """Writes a new record; ALREADY_EXISTS when the id is taken (atomic, an etcd transaction)."""
        tx = self.etcd.transactions
        succeeded, _ = await self.etcd.transaction(
            compare=[tx.version(record.key) == 0], success=[tx.put(record.key, record.encode())], failure=[]
        )
        if not succeeded:
            raise AlreadyExists(
                f"sandbox {record.id} already exists",
                reason="SANDBOX_EXISTS",
                metadata={"sandbox": f"sandboxes/{record.id}"},
            )

    async def put(self, record: SandboxRecord) -> None:
        record.touch()
        await self.etcd.put(record.key, record.encode())

    async def get(self, sandbox_id: str) -> SandboxRecord:
        result = await self.etcd.get(f"{SANDBOXES_PREFIX}{sandbox_id}".encode())
        if result is None:
            raise NotFound(
                f"sandbox {sandbox_id} does not exist",
                reason="SANDBOX_NOT_FOUND",
                metadata={"sandbox": f"sandboxes/{sandbox_id}"},
            )
        record = SandboxRecord.decode(sandbox_id, result.value, result.mod_revision)
        tenant = current_tenant()
        if tenant is not None and record.tenant != tenant:
            # Another tenant's sandbox looks exactly like one that does not exist.
            raise NotFound(
                f"sandbox {sandbox_id} does not exist",
                reason="SANDBOX_NOT_FOUND",
                metadata={"sandbox": f"sandboxes/{sandbox_id}"},
            )
        await self._merge_vm_state(record)
        return record

    async def list(self) -> list[SandboxRecord]:
        result = await self.etcd.get_prefix(SANDBOXES_PREFIX.encode())
        records = [
            SandboxRecord.decode(kv.key.decode()[len(SANDBOXES_PREFIX) :], kv.value, kv.mod_revision) for kv in result
        ]
        tenant = current_tenant()
        if tenant is not None:
            records = [r for r in records if r.tenant == tenant]
        vms = {kv.key.decode(): json.loads(kv.value) for kv in await self.etcd.get_prefix(VMS_PREFIX.encode())}
        for record in records:
            self._apply_vm(record, vms.get(f"{VMS_PREFIX}{record.node}/{record.id}"))
        return records

    async def delete(self, record: SandboxRecord) -> None:
        await self.etcd.delete(record.key)

    async def _merge_vm_state(self, record: SandboxRecord) -> None:
        if not record.node:
            return
        result = await self.etcd.get(f"{VMS_PREFIX}{record.node}/{record.id}".encode())
        self._apply_vm(record, json.loads(result.value) if result else None)

    @staticmethod
    def _apply_vm(record: SandboxRecord, vm: dict | None) -> None:
        state = record.sandbox.state
        if state not in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED) or not record.node:
            return
        if vm is None:
            record.sandbox.state = sandbox_pb2.SANDBOX_STATE_FAILED
            record.sandbox.failure_message = "the VM record is gone from its node"
            return
        record.sandbox.state = VM_STATE_TO_SANDBOX[vm["state"]]
        if vm["state"] in ("FAILED", "STOPPED"):
            record.sandbox.failure_message = vm.get("failure_message") or f"the VM is {vm['state']}"
