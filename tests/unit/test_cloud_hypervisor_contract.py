"""The Cloud Hypervisor driver against Cloud Hypervisor's own OpenAPI spec.

This host has no KVM and no cloud-hypervisor binary, so the contract is proven two ways: every request body
the driver can build is validated against the spec's schemas, and the driver runs end to end against a
stand-in binary (tests/fakes/fake_cloud_hypervisor.py) that refuses anything the spec does not allow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from images.builder import BuiltImage
from microvm.types.v1.vm_pb2 import GuestNic, VmRecord
from services.common.config import ConfigError
from services.common.errors import FailedPrecondition
from services.compute import hypervisor
from services.compute.cloud_hypervisor import ENDPOINTS, ChApi, CloudHypervisorDriver, CloudHypervisorError
from tests.fakes.cloud_hypervisor_spec import operation, request_schema, validate

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_cloud_hypervisor.py"
pytestmark = pytest.mark.timeout(60)


def kvm_choice() -> hypervisor.HypervisorChoice:
    return hypervisor.HypervisorChoice("cloud-hypervisor", "kvm", "test")


@pytest.fixture
def image(tmp_path) -> BuiltImage:
    directory = tmp_path / "image"
    directory.mkdir()
    for name in ("vmlinux", "bzImage", "initramfs.cpio.gz"):
        (directory / name).write_bytes(b"\0")
    subprocess.run(["truncate", "-s", "16M", str(directory / "rootfs.ext4")], check=True)
    (directory / "manifest.json").write_text(json.dumps({"template": "default"}))
    (directory / ".complete").touch()
    return BuiltImage.at(directory)


def record(directory: Path, image: BuiltImage, **fields) -> VmRecord:
    values = dict(
        id="vm-1",
        node="n",
        template="default",
        image_dir=str(image.directory),
        vcpus=2,
        memory_mib=512,
        hostname="vm-1",
        vmm="cloud-hypervisor",
        accel="kvm",
        directory=str(directory),
    )
    nic = {k: fields.pop(k) for k in ("tap_device", "mac_address", "guest_cidr") if k in fields}
    values.update(fields)
    return VmRecord(**values, nic=GuestNic(**nic) if nic else None)


def test_every_endpoint_the_driver_calls_exists_in_the_spec():
    missing = [f"{m} /{e}" for m, e in sorted(ENDPOINTS) if operation(m, e) is None]
    assert missing == []


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"vcpus": 8, "memory_mib": 8192, "ram_path": "/dev/shm/x.ram", "ram_shared": True},
        {"boot_hostname": "source-host"},
        {"tap_device": "mvt0123456789a", "mac_address": "0a:58:0a:d5:00:02", "guest_cidr": "10.213.0.2/20"},
    ],
)
def test_vm_config_validates_against_the_vm_config_schema(tmp_path, image, fields):
    driver = CloudHypervisorDriver(kvm_choice(), "cloud-hypervisor")
    config = driver.vm_config(record(tmp_path, image, **fields), image, tmp_path)
    assert validate(request_schema("PUT", "vm.create"), config) == []
    assert config["payload"]["kernel"].endswith("vmlinux")  # ELF through PVH: no firmware needed
    assert config["vsock"]["cid"] >= 3
    # the console on a socket compute drains into a bounded log, never a file the VMM grows
    assert config["serial"] == {"mode": "Socket", "socket": str(tmp_path / "console.sock")}
    if fields.get("tap_device"):
        assert config["net"] == [{"tap": "mvt0123456789a", "mac": "0a:58:0a:d5:00:02", "num_queues": 2}]


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("vm.resize", {"desired_vcpus": 2}),
        ("vm.resize", {"desired_ram": 1 << 30}),
        ("vm.snapshot", {"destination_url": "file:///tmp/snap"}),
        ("vm.restore", {"source_url": "file:///tmp/snap", "prefault": False}),
    ],
)
def test_request_bodies_validate(endpoint, body):
    assert validate(request_schema("PUT", endpoint), body) == []


def test_the_validator_rejects_what_the_spec_forbids():
    schema = request_schema("PUT", "vm.create")
    assert validate(schema, {"payload": {"kernel": "k"}, "cpus": {"boot_vcpus": "two"}})
    assert validate(schema, {"payload": {"kernel": "k"}, "vsock": {"cid": 1, "socket": "s"}})
    assert validate(schema, {"payload": {"kernel": "k"}, "disk": []})  # a typo: `disks`


@pytest.fixture
def fake_ch(tmp_path, monkeypatch):
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_CH_LOG", str(log))
    wrapper = tmp_path / "cloud-hypervisor"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    wrapper.chmod(0o755)
    yield str(wrapper), log
    subprocess.run(["pkill", "-f", str(FAKE)], check=False)


def logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def test_driver_lifecycle_snapshot_and_restore_speak_only_the_spec(tmp_path, image, fake_ch):
    binary, log = fake_ch
    driver = CloudHypervisorDriver(kvm_choice(), binary)
    source = tmp_path / "source"
    source.mkdir()
    vm = record(source, image, tap_device="mvt00000000001", mac_address="0a:58:0a:d5:00:02")
    pid = await driver.launch(vm, image, source)
    assert driver.owns_process(pid, source)
    assert await driver.status(source) == "running"
    await driver.pause(source)
    assert await driver.status(source) == "paused"
    await driver.resume(source)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    assert await driver.snapshot(vm, frozen, image.rootfs) == "cloud-hypervisor"
    assert await driver.status(source) == "running"  # resumed after the snapshot
    assert (frozen / "vmm-state.tar").exists() and (frozen / "disk.qcow2").exists()
    clone_dir = tmp_path / "clone"
    clone_dir.mkdir()
    await driver.restore(
        record(clone_dir, image, id="vm-2", tap_device="mvt00000000002", mac_address="0a:58:0a:d5:00:03"),
        image,
        clone_dir,
        frozen,
    )
    assert await driver.status(clone_dir) == "running"
    restored = json.loads((clone_dir / "restore" / "config.json").read_text())
    assert restored["disks"][0]["path"] == str(driver.paths(clone_dir)["disk"])  # its own disk, not the source's
    assert restored["vsock"]["socket"] == str(driver.paths(clone_dir)["agent"])
    assert restored["serial"] == {"mode": "Socket", "socket": str(driver.paths(clone_dir)["console"])}
    assert [(n["tap"], n["mac"]) for n in restored["net"]] == [("mvt00000000002", "0a:58:0a:d5:00:03")]  # its own NIC
    api = driver.api(source)
    await api.counters()
    await api.resize(vcpus=2)
    await api.shutdown()
    await api.shutdown_vmm()
    requests = logged(log)
    assert [r for r in requests if r["errors"]] == []
    called = {(r["method"], r["endpoint"]) for r in requests}
    assert {("PUT", "vm.create"), ("PUT", "vm.boot"), ("PUT", "vm.snapshot"), ("PUT", "vm.restore")} <= called
    os.kill(pid, 9)


async def test_vmm_errors_become_statuses_with_the_vmms_message(tmp_path, image, fake_ch):
    binary, _ = fake_ch
    driver = CloudHypervisorDriver(kvm_choice(), binary)
    await driver._spawn(tmp_path)
    with pytest.raises(CloudHypervisorError) as failure:
        await driver.api(tmp_path).pause()  # nothing created yet
    assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "VM is not created" in failure.value.message
    with pytest.raises(ValueError):
        await ChApi(str(tmp_path / "api.sock")).request("PUT", "vm.not-an-endpoint")


async def test_missing_binary_is_a_failed_precondition_not_a_crash(tmp_path, image):
    driver = CloudHypervisorDriver(kvm_choice(), str(tmp_path / "no-such-binary"))
    with pytest.raises(FailedPrecondition) as failure:
        await driver.launch(record(tmp_path, image), image, tmp_path)
    assert failure.value.reason == "VMM_MISSING"


def test_selection_prefers_cloud_hypervisor_only_with_kvm_and_the_binary(tmp_path):
    no_kvm = "flags\t: fpu sse2\n"
    with pytest.raises(ConfigError, match="not on PATH"):
        hypervisor.choose("cloud-hypervisor", "auto", "qemu-system-x86_64", str(tmp_path / "missing"), no_kvm)
    with pytest.raises(ConfigError, match="needs KVM"):
        hypervisor.choose("cloud-hypervisor", "tcg", "qemu-system-x86_64", "sh", no_kvm)
    auto = hypervisor.choose("auto", "auto", "qemu-system-x86_64", "sh", no_kvm)
    assert (auto.vmm, auto.accel) == ("qemu", "tcg")
    assert hypervisor.choose("auto", "tcg", "qemu-system-x86_64", "sh", no_kvm).reason.startswith("forced")
