"""Which VMM and accelerator this host uses: detected, never assumed, and overridable by config.

KVM is used only where the CPU flags show vmx or svm and /dev/kvm opens: a nested PVM host has /dev/kvm
but hangs stock kernels, and shows neither flag.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from services.common.config import ConfigError


@dataclass(frozen=True)
class HypervisorChoice:
    vmm: str  # "qemu" or "cloud-hypervisor"
    accel: str  # "kvm" or "tcg"
    reason: str

    @property
    def label(self) -> str:
        return f"{self.vmm}/{self.accel}"


def cpu_has_virtualization(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "vmx" in flags or "svm" in flags
    return False


def kvm_usable(cpuinfo: str | None = None) -> bool:
    return cpu_has_virtualization(cpuinfo) and os.access("/dev/kvm", os.R_OK | os.W_OK)


def choose(
    vmm: str, accel: str, qemu_binary: str, cloud_hypervisor_binary: str, cpuinfo: str | None = None
) -> HypervisorChoice:
    kvm = kvm_usable(cpuinfo)
    if accel == "kvm" and not os.path.exists("/dev/kvm"):
        raise ConfigError("compute.accel is kvm but /dev/kvm does not exist")
    chosen_accel = accel if accel != "auto" else ("kvm" if kvm else "tcg")
    has_ch = shutil.which(cloud_hypervisor_binary) is not None
    if vmm == "cloud-hypervisor":
        if not has_ch:
            raise ConfigError(f"compute.vmm is cloud-hypervisor but {cloud_hypervisor_binary!r} is not on PATH")
        if chosen_accel != "kvm":
            raise ConfigError("Cloud Hypervisor needs KVM; this host has no usable KVM (no vmx/svm flag)")
        return HypervisorChoice("cloud-hypervisor", "kvm", "forced by compute.vmm=cloud-hypervisor")
    if vmm == "auto" and has_ch and chosen_accel == "kvm":
        return HypervisorChoice("cloud-hypervisor", "kvm", "KVM usable and cloud-hypervisor installed")
    if shutil.which(qemu_binary) is None:
        raise ConfigError(f"{qemu_binary!r} is not on PATH (Debian: apt-get install qemu-system-x86)")
    reason = {"auto": "KVM usable (vmx/svm)" if kvm else "no vmx/svm flag: software emulation"}.get(
        accel, f"forced by compute.accel={accel}"
    )
    return HypervisorChoice("qemu", chosen_accel, reason)


def host_tsc_khz() -> int:
    """The host TSC frequency; guests under TCG see it, and telling them skips a calibration that can hang."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_100_000
