"""Sandbox lifecycle against real guests: validation, listing, update, expiry, delete, and faults."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, json_format

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import vm_pb2
from services.common.errors import error_info
from services.common.records import VMS, Records
from services.gateway.records import sandbox_key

pytestmark = pytest.mark.guest


def instances(stack, kind):
    return [i for i in stack.registered() if i.kind == kind]


def live_instance(stack, kind):
    """The running instance of `kind` (a killed one stays registered until its lease expires)."""
    return max((i for i in instances(stack, kind) if alive(i.pid)), key=lambda i: i.started)


def etcd_keys(stack, prefix: str) -> list[str]:
    async def read():
        client = stack.etcd_client()
        await client.connect()
        try:
            return [kv.key.decode() for kv in await client.get_prefix(prefix.encode())]
        finally:
            await client.close()

    return asyncio.run(read())


def held_keys(stack, sandbox_id: str) -> list[str]:
    """The keys still naming the sandbox, but its tombstone (kept a day on purpose: a later call says what became of
    it)."""
    return [
        k for k in etcd_keys(stack, "/microvm/") if sandbox_id in k and not k.startswith("/microvm/sandbox-tombstones/")
    ]


def vm_records(stack) -> list[dict]:
    async def read():
        client = stack.etcd_client()
        await client.connect()
        try:
            return [vm_as_dict(stored.message) for stored in await Records(client).list(VMS)]
        finally:
            await client.close()

    return asyncio.run(read())


def vm_as_dict(vm) -> dict:
    """A VM record as a dict (field names as declared; state without its prefix)."""
    record = json_format.MessageToDict(vm, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {**record, "state": vm_pb2.VmState.Name(vm.state).removeprefix("VM_STATE_")}


def vm_record(stack, sandbox_id: str) -> dict:
    """Compute's record of a sandbox's VM (its directory may be a warm-pool one, not named after it)."""
    # A sandbox's VM id is its cluster id (the admin key's tenant is "default"); compute's tests name VMs directly.
    (record,) = [r for r in vm_records(stack) if r["id"] in (sandbox_id, sandbox_key("default", sandbox_id))]
    return record


def released(directory: Path) -> bool:
    """A failed VM's directory holds nothing but its console log (kept to say why, until the VM is deleted)."""
    kept = ("console.log", "console.index")
    return not directory.exists() or all(p.name.startswith(kept) for p in directory.iterdir())


def vm_pid(stack, sandbox_id: str) -> int:
    return int((Path(vm_record(stack, sandbox_id)["directory"]) / "vmm.pid").read_text())


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def exec_outcome_while(gateway, sandbox, disruption) -> object:
    """Runs a long exec, applies `disruption` one second in, and returns how the exec ended."""
    outcome = {}

    def run_exec():
        try:
            gateway.exec(sandbox.name, ["sleep", "120"], timeout=90)
            outcome["result"] = "finished"
        except grpc.RpcError as error:
            outcome["result"] = error.code()

    worker = threading.Thread(target=run_exec)
    worker.start()
    time.sleep(1.0)
    disruption()
    worker.join(timeout=30)
    return outcome.get("result")


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.mark.parametrize(
    "fields, code, reason",
    [
        ({"vcpus": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "VCPUS_OUT_OF_RANGE"),
        ({"memory_mib": 64}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"memory_mib": 10_000_000}, grpc.StatusCode.INVALID_ARGUMENT, "MEMORY_OUT_OF_RANGE"),
        ({"template": "no-such-template"}, grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND"),
        ({"labels": {"Bad Key": "x"}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
def test_bad_create_requests_are_refused_with_a_clear_status(gateway, fields, code, reason):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.create(**fields)
    assert failure.value.code() == code
    assert error_info(failure.value).reason == reason
    assert gateway.stub.ListSandboxes(api.ListSandboxesRequest(filter="labels.never=x"), timeout=10).sandboxes == []


def test_timeout_beyond_the_maximum_is_refused(gateway):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.create(timeout_seconds=10 * 86400)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_name_is_invalid_argument(gateway):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.stub.GetSandbox(api.GetSandboxRequest(name="sandbox/x"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_list_filter_and_update(gateway, sandbox):
    got = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=10).sandbox
    assert got.state == sandbox_pb2.SANDBOX_STATE_RUNNING and got.hypervisor.startswith("qemu/")
    listed = gateway.stub.ListSandboxes(api.ListSandboxesRequest(filter="labels.suite=shared"), timeout=10)
    assert [s.name for s in listed.sandboxes] == [sandbox.name]
    before = got.expire_time.ToSeconds()
    updated = gateway.stub.UpdateSandbox(
        api.UpdateSandboxRequest(
            sandbox=sandbox_pb2.Sandbox(
                name=sandbox.name,
                labels={"suite": "shared", "extra": "yes"},
                timeout=duration_pb2.Duration(seconds=3600),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["labels", "timeout"]),
        ),
        timeout=10,
    ).sandbox
    assert updated.labels["extra"] == "yes"
    assert updated.expire_time.ToSeconds() > before + 1800


def test_expired_sandbox_is_deleted_with_everything_it_held(stack, gateway):
    sandbox = gateway.create(timeout_seconds=15)  # longer than a cold boot, should the pool be empty
    sandbox_id = sandbox.name.split("/")[1]
    directory = Path(vm_record(stack, sandbox_id)["directory"])
    pid = vm_pid(stack, sandbox_id)
    assert alive(pid)

    def gone():
        try:
            gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=5)
            return False
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND

    assert wait_for(gone, timeout=45)
    assert wait_for(lambda: not alive(pid), timeout=10)
    assert not directory.exists()
    assert not held_keys(stack, sandbox_id)


def test_delete_frees_the_vm_process_disk_and_records(stack, gateway):
    sandbox = gateway.create()
    sandbox_id = sandbox.name.split("/")[1]
    directory = Path(vm_record(stack, sandbox_id)["directory"])
    pid = vm_pid(stack, sandbox_id)
    gateway.delete(sandbox.name)
    assert wait_for(lambda: not alive(pid), timeout=10)
    assert not directory.exists()
    assert not held_keys(stack, sandbox_id)
    with pytest.raises(grpc.RpcError) as failure:
        gateway.delete(sandbox.name)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_killing_compute_ends_a_running_exec_and_the_vm_is_readopted(stack, gateway):
    sandbox = gateway.create()
    try:
        compute = live_instance(stack, "compute")
        result = exec_outcome_while(gateway, sandbox, lambda: os.kill(compute.pid, signal.SIGKILL))
        assert result == grpc.StatusCode.UNAVAILABLE
        # The supervisor restarts compute, which re-adopts the still-running VM.
        assert wait_for(lambda: [i for i in instances(stack, "compute") if i.pid != compute.pid], timeout=20)
        assert wait_for(
            lambda: (
                gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=5).sandbox.state
                == sandbox_pb2.SANDBOX_STATE_RUNNING
            ),
            timeout=20,
        )
        assert gateway.exec(sandbox.name, ["echo", "still here"]).stdout == b"still here\n"
        assert "adopted" in stack.log("compute")
    finally:
        gateway.delete(sandbox.name)


def test_vm_that_died_while_compute_was_down_is_marked_failed_and_cleaned_up(stack, gateway):
    sandbox = gateway.create()
    sandbox_id = sandbox.name.split("/")[1]
    compute = live_instance(stack, "compute")
    directory = Path(vm_record(stack, sandbox_id)["directory"])
    pid = vm_pid(stack, sandbox_id)
    os.kill(compute.pid, signal.SIGSTOP)  # frozen: it cannot notice the VM dying
    os.kill(pid, signal.SIGKILL)
    os.kill(compute.pid, signal.SIGKILL)
    try:

        def failed():
            got = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=5).sandbox
            return got if got.state == sandbox_pb2.SANDBOX_STATE_FAILED else None

        got = wait_for(failed, timeout=30)
        assert got and "not running" in got.failure_message
        assert released(directory)
        with pytest.raises(grpc.RpcError) as failure:
            gateway.exec(sandbox.name, ["true"])
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        gateway.delete(sandbox.name)
    assert not held_keys(stack, sandbox_id)


def test_pool_vm_that_died_while_compute_was_down_is_removed_on_restart(stack, gateway):
    def pool_ids():
        return [
            k.rsplit("/", 1)[1] for k in etcd_keys(stack, "/microvm/vms/") if k.rsplit("/", 1)[1].startswith("pool-")
        ]

    assert wait_for(pool_ids, timeout=120), "the warm pool never filled"
    victim = pool_ids()[0]
    directory = Path(vm_record(stack, victim)["directory"])
    compute = live_instance(stack, "compute")
    os.kill(compute.pid, signal.SIGSTOP)
    os.kill(vm_pid(stack, victim), signal.SIGKILL)
    os.kill(compute.pid, signal.SIGKILL)
    # The restarted compute drops the dead pool VM (record and files), not only dead sandboxes' VMs.
    assert wait_for(lambda: victim not in pool_ids(), timeout=30)
    assert wait_for(lambda: not directory.exists(), timeout=10)
    # A handed-out VM is never that one.
    sandbox = gateway.create()
    try:
        assert gateway.exec(sandbox.name, ["echo", "fine"]).stdout == b"fine\n"
    finally:
        gateway.delete(sandbox.name)


def test_exec_ends_unavailable_when_its_sandbox_is_deleted(gateway):
    sandbox = gateway.create()
    result = exec_outcome_while(gateway, sandbox, lambda: gateway.delete(sandbox.name))
    assert result == grpc.StatusCode.UNAVAILABLE


def test_stopped_vm_starts_again_from_its_kept_disk(stack, gateway):
    from microvm.compute.v1 import compute_pb2, compute_pb2_grpc

    sandbox = gateway.create()
    vm_id = sandbox_key("default", sandbox.name.split("/")[1])  # the admin key's tenant
    try:
        # No sync: the guest still holds the write in its page cache; StopVm has it synced before the VMM goes.
        gateway.write_file(sandbox.name, "/root/kept.txt", b"survives a stop")
        compute = compute_pb2_grpc.ComputeServiceStub(stack.internal_channel(live_instance(stack, "compute").address))
        started_at = time.monotonic()
        stopped = compute.StopVm(compute_pb2.StopVmRequest(vm_id=vm_id), timeout=30).vm
        assert time.monotonic() - started_at < 10
        assert stopped.state == vm_pb2.VM_STATE_STOPPED and stopped.pid == 0
        started = compute.StartVm(compute_pb2.StartVmRequest(vm_id=vm_id), timeout=120).vm
        assert started.state == vm_pb2.VM_STATE_RUNNING
        assert gateway.read_file(sandbox.name, "/root/kept.txt") == b"survives a stop"
    finally:
        gateway.delete(sandbox.name)


@pytest.mark.parametrize("fields, method", [({}, "warm-pool"), ({"memory_mib": 384}, "cold-boot")])
def test_default_size_starts_from_the_warm_pool_and_other_sizes_boot_cold(stack, gateway, fields, method):
    # Let the pool refill after earlier tests took from it.
    # (a pool VM is ready once paused; its record exists from the start of its restore)
    def ready_pool_vms():
        return [r for r in vm_records(stack) if r["id"].startswith("pool-") and r["state"] == "PAUSED"]

    assert wait_for(lambda: len(ready_pool_vms()) >= 2, timeout=90)
    sandbox = gateway.create(**fields)
    try:
        assert vm_record(stack, sandbox.name.split("/")[1])["start_method"] == method
        result = gateway.exec(sandbox.name, ["sh", "-c", "hostname; grep MemTotal /proc/meminfo"])
        assert result.stdout.split(b"\n")[0].decode() == sandbox.name.split("/")[1]
    finally:
        gateway.delete(sandbox.name)


def test_a_size_booted_cold_twice_gets_its_own_template_snapshot(stack, gateway):
    def create_and_method(memory_mib: int) -> tuple[str, str]:
        sandbox = gateway.create(memory_mib=memory_mib)
        try:
            method = vm_record(stack, sandbox.name.split("/")[1])["start_method"]
            meminfo = gateway.exec(sandbox.name, ["grep", "MemTotal", "/proc/meminfo"]).stdout.decode()
        finally:
            gateway.delete(sandbox.name)
        return method, meminfo

    assert create_and_method(288)[0] == "cold-boot"
    assert create_and_method(288)[0] == "cold-boot"  # the second cold boot of the size asks for a template
    templates = stack.state_dir / "compute" / "templates" / "default"
    assert wait_for(lambda: [d for d in templates.glob("*-1c288m") if (d / ".complete").exists()], timeout=120)
    method, meminfo = create_and_method(288)
    assert method == "template-snapshot"
    assert 200 * 1024 < int(meminfo.split()[1]) <= 288 * 1024  # the size asked for, not the default's
