"""One conformance suite that every VMM driver must pass, run through the whole stack.

QEMU runs it here for real. Cloud Hypervisor runs it where `cloud-hypervisor` is on PATH and KVM is usable
(CPU flags show vmx/svm); elsewhere its half is reported as skipped, with the reason. The fake driver that the
fast tests use runs it too, so it cannot drift from what the real drivers do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.compute.hypervisor import kvm_usable
from tests.guests import Gateway
from tests.integration.test_sandbox_lifecycle import alive, released, vm_record, wait_for
from tests.stack import start_stack

pytestmark = pytest.mark.guest
DRIVERS = ["qemu", "cloud-hypervisor", "fake"]


def unavailable_reason(driver: str) -> str | None:
    if driver == "cloud-hypervisor":
        if shutil.which("cloud-hypervisor") is None:
            return "cloud-hypervisor is not on PATH (no registry ships it for this host)"
        if not kvm_usable():
            return "KVM is not usable here (the CPU shows no vmx/svm flag)"
    return None


@pytest.fixture(scope="module", params=DRIVERS)
def driver_stack(request, tmp_path_factory):
    reason = unavailable_reason(request.param)
    if reason:
        pytest.skip(f"{request.param} conformance skipped: {reason}")
    stack = start_stack(
        tmp_path_factory.mktemp(f"conformance-{request.param}"),
        {"compute": {"vmm": request.param, "warm_pool_size": 1}},
    )
    stack.driver = request.param
    stack.gateway = Gateway(stack.gateway_address, stack.admin_key)
    yield stack
    stack.stop()


def test_lifecycle(driver_stack):
    gateway = driver_stack.gateway
    sandbox = gateway.create(labels={"conformance": driver_stack.driver})
    sandbox_id = sandbox.name.split("/")[1]
    assert sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING
    assert sandbox.hypervisor.startswith(driver_stack.driver + "/")
    directory = Path(vm_record(driver_stack, sandbox_id)["directory"])
    gateway.delete(sandbox.name)
    assert not directory.exists()


def test_exec_and_files(driver_stack):
    gateway = driver_stack.gateway
    sandbox = gateway.create()
    try:
        result = gateway.exec(sandbox.name, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
        data = os.urandom(3 << 20)
        gateway.write_file(sandbox.name, "/root/blob", data)
        assert gateway.read_file(sandbox.name, "/root/blob") == data
    finally:
        gateway.delete(sandbox.name)


def test_pause_and_resume(driver_stack):
    gateway = driver_stack.gateway
    sandbox = gateway.create()
    try:
        paused = gateway.stub.PauseSandbox(api.PauseSandboxRequest(name=sandbox.name), timeout=30).sandbox
        assert paused.state == sandbox_pb2.SANDBOX_STATE_PAUSED
        gateway.stub.ResumeSandbox(api.ResumeSandboxRequest(name=sandbox.name), timeout=30)
        assert gateway.exec(sandbox.name, ["echo", "back"]).stdout == b"back\n"
    finally:
        gateway.delete(sandbox.name)


def test_snapshot_restore_and_fork(driver_stack):
    gateway = driver_stack.gateway
    sandbox = gateway.create(memory_mib=320)  # cold boot, whatever the pool holds
    clones = []
    try:
        gateway.write_file(sandbox.name, "/root/state.txt", b"kept")
        snapshot = gateway.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=sandbox.name), timeout=300).snapshot
        clones.append(
            gateway.stub.RestoreSnapshot(api.RestoreSnapshotRequest(snapshot=snapshot.name), timeout=300).sandbox
        )
        clones += gateway.stub.ForkSandbox(api.ForkSandboxRequest(name=sandbox.name, count=2), timeout=300).sandboxes
        for clone in clones:
            assert gateway.read_file(clone.name, "/root/state.txt") == b"kept"
            assert gateway.exec(clone.name, ["hostname"]).stdout.decode().strip() == clone.name.split("/")[1]
    finally:
        for clone in clones:
            gateway.delete(clone.name)
        gateway.delete(sandbox.name)


def test_killed_vmm_marks_the_vm_failed_and_releases_it(driver_stack):
    gateway = driver_stack.gateway
    sandbox = gateway.create()
    record = vm_record(driver_stack, sandbox.name.split("/")[1])
    directory = Path(record["directory"])
    os.kill(record["pid"], signal.SIGKILL)

    def failed():
        got = gateway.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), timeout=5).sandbox
        return got.state == sandbox_pb2.SANDBOX_STATE_FAILED and got

    got = wait_for(failed, timeout=20)
    assert got and "exited unexpectedly" in got.failure_message
    assert wait_for(lambda: released(directory), timeout=10)
    assert not alive(record["pid"])
    gateway.delete(sandbox.name)


def test_missing_vmm_binary_fails_at_start_with_a_clear_message(driver_stack, tmp_path):
    if driver_stack.driver == "fake":
        pytest.skip("the fake driver runs the agent with this Python: it has no binary to miss")
    key = "qemu_binary" if driver_stack.driver == "qemu" else "cloud_hypervisor_binary"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"compute": {"vmm": driver_stack.driver, key: "/nonexistent/vmm"}}))
    result = subprocess.run(
        [sys.executable, "-m", "services.compute", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(
            os.environ,
            MVM_ETCD_ENDPOINTS=driver_stack.etcd_endpoint,
            MVM_STATE_DIR=str(driver_stack.state_dir),
            MVM_NODE_ID="missing-vmm",
        ),  # a node of its own: the stack's compute holds its node's lock
    )
    assert result.returncode == 2
    assert "/nonexistent/vmm" in result.stderr and "Traceback" not in result.stderr
