"""VmmDriver: what compute needs from a virtual machine monitor. QEMU and Cloud Hypervisor implement it.

A driver owns the VMM process of each VM (detached, so VMs outlive a compute restart), its devices and
sockets inside the VM's directory, and the VMM's own API (QMP, REST). It never touches etcd or capacity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from images.builder import BuiltImage
from microvm.types.v1.vm_pb2 import VmRecord


class VmmDriver(Protocol):
    name: str  # "qemu" or "cloud-hypervisor"
    accel: str  # "kvm" or "tcg"
    agent_transport: str  # "virtio-serial" or "hybrid-vsock"
    supports_template_snapshots: bool
    disk_format: str  # "qcow2" (a file over its backing file) or "tree" (a directory: the fake)
    # The virtual machine a snapshot's device state belongs to: a snapshot taken under another (devices added or
    # removed by an upgrade) does not restore, and a template snapshot of another is rebuilt, not fetched.
    machine: str
    # The kernel command line every VM boots with (its own name aside): a template snapshot booted with another is
    # rebuilt (its kernel's state, ASLR say, was set at that boot).
    boot_args: str

    def paths(self, directory: Path) -> dict[str, Path]:
        """Files of a VM: at least disk, agent, console and pid."""

    async def launch(self, vm: VmRecord, image: BuiltImage, directory: Path, incoming: bool = False) -> int:
        """Starts the VMM detached and boots the guest; returns the VMM's pid."""

    async def pause(self, directory: Path) -> None: ...

    async def resume(self, directory: Path) -> None: ...

    async def status(self, directory: Path) -> str:
        """`running` or `paused`; raises Unavailable when the VMM does not answer."""

    async def snapshot(self, vm: VmRecord, out: Path, base_image: Path) -> str:
        """Freezes RAM, devices and disk into `out`; returns the snapshot format."""

    async def restore(self, vm: VmRecord, image: BuiltImage, directory: Path, frozen: Path) -> int:
        """Starts a VMM from a frozen snapshot, running; returns its pid."""

    async def share_memory(self, frozen: Path, vm: VmRecord, image: BuiltImage, work: Path) -> bool:
        """Gives a snapshot whose RAM is in its migration stream the form restores map copy-on-write (its RAM as a
        file beside device state alone), using `work` and `vm` (the snapshot's size and devices) for a VMM that
        never runs the guest; `vm.ram_path`, when set, is where it may load the RAM first (in memory), to be copied
        into the snapshot and removed. False when this VMM has no such form; nothing changed then."""

    def owns_process(self, pid: int, directory: Path) -> bool:
        """True when `pid` is still this VM's VMM (pids are reused)."""
