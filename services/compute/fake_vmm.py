"""FakeVmmDriver (`compute.vmm: fake`): a VMM stand-in for tests and for developing without any VMM.

Each "VM" is the guest agent running as a plain host process in simulation mode (`--root`): its disk is a
directory (guest paths live under it), its host name and network changes are only recorded, pause is SIGSTOP
and a snapshot is a copy of that directory. Its serial console is the agent's stdout and stderr, served on a
socket as QEMU serves its serial port (fake_serial.py). It speaks the real agent protocol on the real channel, so
everything above the VMM (relay, compute, gateway, placement, snapshots across nodes) runs for real, in
seconds. There is NO isolation: processes run on the host as the compute service's user. Never offer it to
users; tests/unit/test_vmm_driver_conformance.py holds it to the same contract as the real drivers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from images.builder import BuiltImage
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import FailedPrecondition, Unavailable
from services.compute.disks import pack_tree, unpack_tree

REPO = Path(__file__).resolve().parents[2]
SERIAL = Path(__file__).with_name("fake_serial.py")
MAX_UNIX_PATH = 107


class FakeVmmDriver:
    name = "fake"
    accel = "none"
    agent_transport = "virtio-serial"
    supports_template_snapshots = True
    disk_format = "tree"  # a disk (and a template build layer) is a directory
    machine = "fake-1"
    boot_args = ""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.own_uts = os.geteuid() == 0 and shutil.which("unshare") is not None

    @staticmethod
    def paths(directory: Path) -> dict[str, Path]:
        return {
            "disk": directory / "rootfs",
            "agent": directory / "agent.sock",
            "console": directory / "console.sock",
            "pid": directory / "vmm.pid",
        }

    async def launch(self, vm: VmRecord, image: BuiltImage, directory: Path, incoming: bool = False) -> int:
        p = self.paths(directory)
        for key in ("agent", "console"):
            if len(str(p[key])) > MAX_UNIX_PATH:
                raise FailedPrecondition(
                    f"socket path {p[key]} is longer than a unix socket allows; use a shorter state_dir",
                    reason="STATE_DIR_TOO_LONG",
                )
        if not p["disk"].exists() and image.rootfs.is_dir():  # a user template's image: its files
            await asyncio.to_thread(shutil.copytree, image.rootfs, p["disk"], symlinks=True)
        if not p["disk"].exists():
            for sub in ("root", "tmp", "etc"):
                (p["disk"] / sub).mkdir(parents=True, exist_ok=True)
        p["agent"].unlink(missing_ok=True)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "gen" / "python"), str(REPO / "guest_agents" / "linux")])
        )
        command = [
            self.python,
            "-m",
            "microvm_agent.main",
            "--unix",
            str(p["agent"]),
            "--root",
            str(p["disk"]),
            "--hostname",
            vm.boot_hostname or vm.hostname,
        ]
        if self.own_uts:
            # A UTS namespace of its own: the guest's host name is real for the processes it runs (`hostname`).
            command = ["unshare", "--uts", *command, "--own-uts"]
        serial_in, console = os.pipe()
        try:
            # Like a daemonized VMM, in sessions of their own: they outlive the compute service. The serial port
            # ends when the agent does (no one else holds the pipe's writing end).
            p["console"].unlink(missing_ok=True)
            await asyncio.create_subprocess_exec(
                self.python,
                str(SERIAL),
                str(p["console"]),
                stdin=serial_in,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=str(directory),
                start_new_session=True,
            )
            for _ in range(500):  # as with a real VMM, the serial port is there before the guest runs
                if p["console"].exists():
                    break
                await asyncio.sleep(0.01)
            # Spawned and recorded with no await between: a launch cancelled in that gap (a pool refill at shutdown)
            # left an agent no pid file named, so nothing stopped it. asyncio's spawn awaits after the fork.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                cwd=str(directory),
                env=env,
                start_new_session=True,
            )
            p["pid"].write_text(str(process.pid))
        finally:
            os.close(serial_in)
            os.close(console)
        threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()
        return process.pid

    def _pid(self, directory: Path) -> int:
        try:
            pid = int(self.paths(directory)["pid"].read_text())
        except (OSError, ValueError):
            raise Unavailable(f"no VMM process in {directory}", reason="VMM_UNAVAILABLE") from None
        if not self.owns_process(pid, directory):
            raise Unavailable(f"the VMM process of {directory} is gone", reason="VMM_UNAVAILABLE")
        return pid

    async def pause(self, directory: Path) -> None:
        os.kill(self._pid(directory), signal.SIGSTOP)

    async def resume(self, directory: Path) -> None:
        os.kill(self._pid(directory), signal.SIGCONT)

    async def status(self, directory: Path) -> str:
        pid = self._pid(directory)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return "paused" if state in ("T", "t") else "running"

    async def snapshot(self, vm: VmRecord, out: Path, base_image: Path) -> str:
        """The disk directory as an archive, taken while the process is stopped (a consistent instant)."""
        directory = Path(vm.directory)
        was_running = await self.status(directory) == "running"
        if was_running:
            await self.pause(directory)
        try:
            await asyncio.to_thread(pack_tree, self.paths(directory)["disk"], out / "disk.tar")
            (out / "devices.bin").write_text(json.dumps({"hostname": vm.hostname}))
        finally:
            if was_running:
                await self.resume(directory)
        return "fake"

    async def restore(self, vm: VmRecord, image: BuiltImage, directory: Path, frozen: Path) -> int:
        disk = self.paths(directory)["disk"]
        shutil.rmtree(disk, ignore_errors=True)
        await asyncio.to_thread(_unpack, frozen / "disk.tar", disk)
        return await self.launch(vm, image, directory)

    async def share_memory(self, frozen: Path, vm: VmRecord, image: BuiltImage, work: Path) -> bool:
        return False  # its snapshots hold no RAM

    def owns_process(self, pid: int, directory: Path) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.paths(directory)["agent"]).encode() in cmdline and b"microvm_agent.main" in cmdline


def _unpack(archive: Path, tree: Path) -> None:
    unpack_tree(archive, tree)
    if not any(tree.iterdir()):
        raise FailedPrecondition(f"snapshot disk {archive} is empty", reason="SNAPSHOT_EMPTY")
