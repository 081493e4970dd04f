"""compute.guest_aslr: guests under TCG boot without address space randomization unless asked (settings.py says
why), and a template snapshot booted with other kernel arguments is not reused (test_compute_node)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from microvm.types.v1.vm_pb2 import VmRecord
from services.common.config import ConfigError
from services.common.settings import ComputeSettings
from services.compute.hypervisor import HypervisorChoice
from services.compute.qemu import QemuDriver


@pytest.mark.parametrize(
    ("setting", "accel", "randomized"),
    [("auto", "tcg", False), ("auto", "kvm", True), ("on", "tcg", True), ("off", "kvm", False)],
)
def test_auto_randomizes_under_kvm_only(setting, accel, randomized):
    assert ComputeSettings(guest_aslr=setting).aslr_for(accel) is randomized


def test_an_unknown_value_is_a_configuration_error():
    with pytest.raises(ConfigError, match="guest_aslr"):
        ComputeSettings(guest_aslr="sometimes").validate()


@pytest.mark.parametrize("aslr", [True, False])
def test_the_qemu_command_line_says_norandmaps_exactly_when_off(tmp_path, aslr):
    driver = QemuDriver(HypervisorChoice("qemu", "tcg", "test"), "qemu-system-x86_64", 64, aslr=aslr)
    vm = VmRecord(id="vm-1", hostname="vm-1", vcpus=1, memory_mib=256)
    image = SimpleNamespace(kernel=Path("/k"), initramfs=Path("/i"), rootfs=Path("/r"))
    command = driver.command(vm, image, tmp_path)
    append = command[command.index("-append") + 1]
    assert ("norandmaps" in append.split()) is not aslr
    assert append == f"{driver.boot_args} mvm.hostname=vm-1"
