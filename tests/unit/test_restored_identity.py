"""A restored VM (a template snapshot's, a fork's clone, a snapshot's restore) is given its own identity before it
counts as started, confirmed behind the start as a claimed pool VM's is (the relay fails a guest that never
confirms: tests/unit/test_hostile_guest.py). A cold-booted VM and a pool VM being filled get none here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from microvm.types.v1 import vm_pb2
from services.compute.lifecycle import VmLifecycle


class RecordingGuests:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def wait_for_agent(self, vm_id, timeout, alive=None, describe=None) -> None:
        self.calls.append(("wait_for_agent", vm_id))

    async def configure_network(self, vm_id) -> None:
        self.calls.append(("configure_network", vm_id))

    async def set_identity(self, vm_id: str, hostname: str, confirm_later: bool = False) -> None:
        self.calls.append(("set_identity", vm_id, hostname, confirm_later))


def lifecycle_with(guests: RecordingGuests) -> VmLifecycle:
    lifecycle = VmLifecycle.__new__(VmLifecycle)  # only what a start's readiness uses
    lifecycle.guests = guests
    lifecycle.settings = SimpleNamespace(boot_timeout_seconds=5)
    lifecycle.processes = SimpleNamespace(alive=lambda vm: True, console_tail=lambda vm: "")
    return lifecycle


@pytest.mark.parametrize("method", ["template-snapshot", "restore"])
async def test_a_restored_vm_gets_its_identity_confirmed_behind_the_start(method):
    guests = RecordingGuests()
    vm = vm_pb2.VmRecord(id="sbx-1", hostname="sbx-1", start_method=method)
    vm.nic.tap_device = "mvt0"
    await lifecycle_with(guests)._until_ready(vm)
    assert guests.calls == [
        ("wait_for_agent", "sbx-1"),
        ("configure_network", "sbx-1"),
        ("set_identity", "sbx-1", "sbx-1", True),
    ]


@pytest.mark.parametrize("pooled", [False, True])
async def test_a_cold_booted_or_pool_filling_vm_gets_no_identity_here(pooled):
    guests = RecordingGuests()
    method = "cold-boot" if not pooled else "template-snapshot"
    await lifecycle_with(guests)._until_ready(vm_pb2.VmRecord(id="vm-1", start_method=method, pooled=pooled))
    assert guests.calls == [("wait_for_agent", "vm-1")]
