"""Compute's own dependency (services/common/dependencies.py): its VMM binary, and /dev/kvm where it runs guests
under KVM. A binary removed or made unusable after the start (a package upgrade gone wrong) shows here before the
next create fails."""

from __future__ import annotations

import os
import shutil

from services.common.dependencies import Dependency


def vmm_dependency(driver) -> Dependency:
    async def check() -> str | None:
        binary = getattr(driver, "binary", None)
        if binary is not None and shutil.which(binary) is None:
            return f"{binary} is not an executable on PATH"
        if driver.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm cannot be opened for reading and writing"
        return None

    return Dependency("vmm", check)
