"""A create whose own record write fails because another gateway's upkeep already finished it (taking this gateway
for gone while its registration had lapsed) returns the sandbox, and never deletes the VM that sandbox runs on
(services/gateway/sandboxes.py start). Stand-ins for the store, nodes and placement: the path is the point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from microvm.types.v1 import vm_pb2
from services.common.errors import Aborted
from services.common.records import Stored
from services.gateway.sandboxes import CREATING, RUNNING, Sandboxes


class Store:
    def __init__(self, stored: sandbox_types.SandboxRecord | None) -> None:
        self.stored = stored
        self.records = SimpleNamespace(get=self._get)

    async def _get(self, kind, sandbox_id):
        return Stored((sandbox_id,), self.stored, 7) if self.stored is not None else None

    async def change(self, record, mutate, expect_states=None, revision=0):
        raise Aborted("the record changed meanwhile", reason="SANDBOX_CHANGED")

    async def vm(self, record):
        return vm_pb2.VmRecord(id=record.id, node=record.node, state=vm_pb2.VM_STATE_RUNNING)

    async def incident(self, record):
        return None


class Placement:
    async def place(self, record, only_node=""):
        record.node = "node-1"
        return 5


class Nodes:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def alive(self, node: str) -> bool:
        return True

    async def on_compute(self, node, call):
        self.deleted.append(node)  # the only compute call of this path: DeleteVm


def sandboxes(store: Store, nodes: Nodes) -> Sandboxes:
    context = SimpleNamespace(settings=SimpleNamespace(), instance_id="gateway-a")
    return Sandboxes(context, store, nodes, Placement(), quotas=None)


def record(state) -> sandbox_types.SandboxRecord:
    return sandbox_types.SandboxRecord(id="sbx-1", name="sbx-1", tenant="t", node="node-1", state=state)


async def start_vm(node: str) -> vm_pb2.VmRecord:
    return vm_pb2.VmRecord(id="sbx-1", node=node, state=vm_pb2.VM_STATE_RUNNING, vmm="fake", accel="none")


async def test_a_create_finished_by_another_gateway_returns_the_sandbox_and_keeps_its_vm():
    nodes = Nodes()
    finished = record(RUNNING)
    sandbox = await sandboxes(Store(finished), nodes).start(record(CREATING), start_vm)
    assert sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING and nodes.deleted == []


@pytest.mark.parametrize("left", [None, record(sandbox_types.SANDBOX_RECORD_STATE_DELETING)])
async def test_a_create_whose_record_was_taken_deletes_its_vm(left):
    nodes = Nodes()
    with pytest.raises(Aborted) as refused:
        await sandboxes(Store(left), nodes).start(record(CREATING), start_vm)
    assert refused.value.reason == "SANDBOX_DELETED_DURING_CREATE" and nodes.deleted == ["node-1"]
