"""The QEMU `microvm` driver: one daemonized qemu per VM, driven over QMP.

Devices: virtio-blk on a per-VM qcow2 overlay over the template's ext4 image, virtio-serial port
`microvm.agent` exposed as a unix socket for the relay, QMP on a unix socket, the serial console on a unix socket
that compute drains into a bounded log (services/compute/console.py; QEMU drops console output while nobody is
connected, so the guest never waits on compute).
Under TCG the translation cache is bounded (`tb-size`): QEMU's default of 1 GiB would otherwise dominate
each guest's memory.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from images.builder import BuiltImage
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import FailedPrecondition
from services.compute.disks import create_overlay, freeze
from services.compute.hypervisor import HypervisorChoice, host_tsc_khz
from services.compute.process_exit import exited
from services.compute.qmp import QmpClient

# Measured here: reliable and fast under TCG (see docs/guest-boot.md).
KERNEL_ARGS = (
    "console=ttyS0 quiet panic=-1 reboot=t cryptomgr.notests=1 mitigations=off nokaslr "
    "i8042.noaux i8042.nokbd i8042.nopnp pci=off tsc=reliable no_timer_check audit=0 "
    "random.trust_cpu=on apparmor=0 rootwait"
)
AGENT_PORT_NAME = "microvm.agent"
MAX_UNIX_PATH = 107


class QemuDriver:
    agent_transport = "virtio-serial"
    # Shared-RAM snapshots (device state + a RAM file mapped copy-on-write) make template restores cheap.
    supports_template_snapshots = True
    disk_format = "qcow2"
    # Changes whenever the machine's options or devices do (`command`): 2 is microvm without a PIT.
    machine = "microvm-2"

    def __init__(self, choice: HypervisorChoice, binary: str, tb_size_mib: int, aslr: bool = True) -> None:
        self.name = "qemu"
        self.accel = choice.accel
        self.binary = binary
        self.tb_size_mib = tb_size_mib
        self.tsc_khz = host_tsc_khz()
        self.boot_args = f"{KERNEL_ARGS} tsc_early_khz={self.tsc_khz} lpj={self.tsc_khz * 4}"
        if not aslr:
            self.boot_args += " norandmaps"

    @staticmethod
    def paths(directory: Path) -> dict[str, Path]:
        return {
            "disk": directory / "disk.qcow2",
            "agent": directory / "agent.sock",
            "qmp": directory / "qmp.sock",
            "console": directory / "console.sock",
            "pid": directory / "vmm.pid",
        }

    def command(self, vm: VmRecord, image: BuiltImage, directory: Path, incoming: bool = False) -> list[str]:
        p = self.paths(directory)
        for key in ("agent", "qmp", "console"):
            if len(str(p[key])) > MAX_UNIX_PATH:
                raise FailedPrecondition(
                    f"socket path {p[key]} is longer than a unix socket allows; use a shorter state_dir",
                    reason="STATE_DIR_TOO_LONG",
                )
        accel = f"tcg,tb-size={self.tb_size_mib}" if self.accel == "tcg" else "kvm"
        cpu = "max" if self.accel == "tcg" else "host"
        append = f"{self.boot_args} mvm.hostname={vm.boot_hostname or vm.hostname}"
        # Every VM's RAM is the backend `mem`, file-backed or not, so migrated state fits any of them.
        # No PIT: a restored guest's PIT kept QEMU's main loop waking 36 times a second (an idle sandbox's VMM took
        # 8 ms of CPU a second, 4 without it); the kernel keeps time with the TSC (tsc_early_khz) and the LAPIC.
        machine = "microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=off,memory-backend=mem"
        backend = f"memory-backend-ram,id=mem,size={vm.memory_mib}M"
        if vm.ram_path:
            backend = (
                f"memory-backend-file,id=mem,size={vm.memory_mib}M,mem-path={vm.ram_path},"
                f"share={'on' if vm.ram_shared else 'off'}"
            )
        memory = ["-object", backend]
        return [
            self.binary,
            "-name",
            f"microvm-{vm.id}",
            "-M",
            machine,
            *memory,
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            str(vm.vcpus),
            "-m",
            f"{vm.memory_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initramfs),
            "-append",
            append,
            "-chardev",
            f"socket,id=serial,path={p['console']},server=on,wait=off",
            "-serial",
            "chardev:serial",
            "-drive",
            f"id=root,file={p['disk']},format=qcow2,if=none,cache=unsafe,discard=unmap",
            "-device",
            "virtio-blk-device,drive=root",
            "-device",
            "virtio-serial-device",
            "-chardev",
            f"socket,path={p['agent']},server=on,wait=off,id=agent",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            *self.nic(vm),
            "-qmp",
            f"unix:{p['qmp']},server=on,wait=off",
            "-daemonize",
            "-pidfile",
            str(p["pid"]),
        ] + (["-incoming", "defer"] if incoming else [])

    @staticmethod
    def nic(vm: VmRecord) -> list[str]:
        """virtio-net on the VM's persistent TAP (created by the network service, never by qemu)."""
        if not vm.nic.tap_device:
            return []
        return [
            "-netdev",
            f"tap,id=net0,ifname={vm.nic.tap_device},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={vm.nic.mac_address}",
        ]

    async def prepare_disk(self, image: BuiltImage, directory: Path) -> None:
        await create_overlay(image.rootfs, "raw", self.paths(directory)["disk"])

    async def launch(self, vm: VmRecord, image: BuiltImage, directory: Path, incoming: bool = False) -> int:
        """Starts qemu detached (it outlives a compute restart) and returns its pid.

        A VM that already has a disk (a stopped one being started again, or a restore) boots from it.
        With `incoming` the VM waits for migrated state instead of booting (see `restore`)."""
        if not self.paths(directory)["disk"].exists():
            await self.prepare_disk(image, directory)
        return await self._start(self.command(vm, image, directory, incoming), directory)

    async def _start(self, command: list[str], directory: Path) -> int:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(directory),
        )
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise FailedPrecondition(
                f"qemu failed to start: {stderr.decode().strip()[-2000:]}", reason="VMM_START_FAILED"
            )
        return int(self.paths(directory)["pid"].read_text())

    async def _qmp(self, directory: Path, command: str, arguments: dict | None = None) -> object:
        client = QmpClient(str(self.paths(directory)["qmp"]))
        await client.connect()
        try:
            return await client.execute(command, arguments)
        finally:
            await client.close()

    async def _wait_for_migration(self, client: QmpClient, timeout: float = 120.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            info = await client.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise FailedPrecondition(f"migration {status}: {info.get('error-desc', '')}", reason="MIGRATION_FAILED")
            if asyncio.get_running_loop().time() > deadline:
                raise FailedPrecondition("migration did not complete in time", reason="MIGRATION_TIMEOUT")
            await asyncio.sleep(0.005)

    async def _save_state(self, client: QmpClient, target: Path, ignore_shared: bool) -> None:
        """The stopped VM's state into `target`; with `ignore_shared` its RAM, when a shared file, stays out."""
        await self._ignore_shared(client, ignore_shared)
        await client.execute("migrate", {"uri": f"exec:cat > {target}"})
        await self._wait_for_migration(client)

    async def _load_state(self, client: QmpClient, source: Path, ignore_shared: bool) -> None:
        """State saved by `_save_state` into a qemu started with `incoming`, the same `ignore_shared`."""
        await self._ignore_shared(client, ignore_shared)
        await client.execute("migrate-incoming", {"uri": f"exec:cat {source}"})
        await self._wait_for_migration(client)

    @staticmethod
    async def _ignore_shared(client: QmpClient, on: bool) -> None:
        capability = {"capability": "x-ignore-shared", "state": on}
        await client.execute("migrate-set-capabilities", {"capabilities": [capability]})

    async def snapshot(self, vm: VmRecord, out: Path, base_image: Path) -> str:
        """Saves RAM + device state and a disk frozen at the same instant into `out`; returns the format.

        `shared-ram`: the VM's RAM lives in a shared file; only device state is migrated and the file is
        copied (clones later map it copy-on-write and share its pages). `stream`: RAM goes into the migration
        stream. The VM is stopped meanwhile; its disk is copied while stopped (restoring RAM onto any other
        disk silently corrupts files), rebased onto the template image so the copy stands alone."""
        directory = Path(vm.directory)
        client = QmpClient(str(self.paths(directory)["qmp"]))
        await client.connect()
        shared = bool(vm.ram_path and vm.ram_shared)
        was_running = False
        try:
            was_running = (await client.execute("query-status")).get("running")
            if was_running:
                await client.execute("stop")
            await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            await self._save_state(client, out / ("devices.bin" if shared else "memory.bin"), ignore_shared=shared)
            if shared:
                copy = await asyncio.create_subprocess_exec("cp", "--sparse=always", vm.ram_path, str(out / "ram"))
                if await copy.wait() != 0:
                    raise FailedPrecondition("cannot copy the VM's memory file", reason="MEMORY_SNAPSHOT_FAILED")
            await freeze(self.paths(directory)["disk"], base_image, out / "disk.qcow2", link_base=True)
            return "shared-ram" if shared else "stream"
        finally:
            try:
                if was_running:  # whatever failed: a snapshot never leaves a running VM stopped
                    await client.execute("cont")
            finally:
                await client.close()

    async def restore(self, vm: VmRecord, image: BuiltImage, directory: Path, frozen: Path) -> int:
        """Starts qemu waiting for state, gives it a fresh overlay on the frozen disk, loads RAM, runs it.

        A `shared-ram` snapshot is mapped copy-on-write (`vm.ram_path` must point at its file, private):
        only device state is read, and clones of one snapshot share its pages."""
        shared = (frozen / "devices.bin").exists()
        await create_overlay(frozen / "disk.qcow2", "qcow2", self.paths(directory)["disk"])
        pid = await self.launch(vm, image, directory, incoming=True)
        client = QmpClient(str(self.paths(directory)["qmp"]))
        await client.connect()
        try:
            await self._load_state(client, frozen / ("devices.bin" if shared else "memory.bin"), ignore_shared=shared)
            # Without `cont` a restored guest stays paused forever.
            await client.execute("cont")
        finally:
            await client.close()
        return pid

    async def share_memory(self, frozen: Path, vm: VmRecord, image: BuiltImage, work: Path) -> bool:
        """A `stream` snapshot made `shared-ram`: a qemu that never runs the guest loads the stream into a shared RAM
        file, then saves its device state alone (`x-ignore-shared`). Restores then map the file copy-on-write
        instead of each loading the stream: clones of one snapshot share its pages. `ram` is moved in before
        `devices.bin`, whose presence makes a restore shared, so a restore meanwhile still finds a complete form.

        The load goes to `vm.ram_path` (tmpfs) when set, then a sparse copy into the snapshot: QEMU writing a guest's
        pages one by one into a shared mapping of a file on ext4 costs a page fault with block allocation each (1.0
        to 1.5 s of CPU for a 256 MiB guest here), against 0.22 s into tmpfs and 0.07 s for the copy."""
        if (frozen / "devices.bin").exists() or not (frozen / "memory.bin").exists():
            return False
        loaded = Path(vm.ram_path) if vm.ram_path else work / "ram"
        helper = VmRecord()
        helper.CopyFrom(vm)
        helper.directory, helper.ram_path, helper.ram_shared = str(work), str(loaded), True
        await create_overlay(frozen / "disk.qcow2", "qcow2", self.paths(work)["disk"])
        command = self.command(helper, image, work, incoming=True)
        if helper.nic.tap_device:
            # virtio-net's state needs a TAP backend to load into: qemu makes one in a network namespace of its own,
            # which goes with it (the guest never runs, so nothing is ever sent).
            command = ["unshare", "--net", *command]
        try:
            await self._load_into_helper(command, work, frozen / "memory.bin")
            if loaded != work / "ram":
                copy = await asyncio.create_subprocess_exec("cp", "--sparse=always", str(loaded), str(work / "ram"))
                if await copy.wait() != 0:
                    raise FailedPrecondition("cannot copy the shared RAM file", reason="MEMORY_SNAPSHOT_FAILED")
        finally:
            if loaded != work / "ram":
                loaded.unlink(missing_ok=True)
        os.rename(work / "ram", frozen / "ram")
        os.rename(work / "devices.bin", frozen / "devices.bin")
        return True

    async def _load_into_helper(self, command: list[str], work: Path, stream: Path) -> None:
        """A qemu that never runs the guest loads `stream` into its shared RAM file and saves its devices alone."""
        pid = await self._start(command, work)
        client = QmpClient(str(self.paths(work)["qmp"]))
        try:
            await client.connect()
            await self._load_state(client, stream, ignore_shared=False)
            await self._save_state(client, work / "devices.bin", ignore_shared=True)
        finally:
            try:
                # quit, not a kill: qemu reaps the `cat` writing devices.bin as it cleans up.
                await asyncio.wait_for(client.execute("quit"), 5)
            except Exception:  # noqa: BLE001 - gone or stuck either way: made sure of below
                pass
            await client.close()
            await exited(pid, 10)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)

    async def pause(self, directory: Path) -> None:
        await self._qmp(directory, "stop")

    async def resume(self, directory: Path) -> None:
        await self._qmp(directory, "cont")

    async def status(self, directory: Path) -> str:
        """`running` or `paused` (QMP's view), raising Unavailable when QMP does not answer."""
        reply = await self._qmp(directory, "query-status")
        return "running" if reply.get("running") else "paused"

    async def quit(self, directory: Path) -> None:
        await self._qmp(directory, "quit")

    def owns_process(self, pid: int, directory: Path) -> bool:
        """True when `pid` is still this VM's qemu (pids get reused)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return (
            str(self.paths(directory)["qmp"]).encode() in cmdline and os.path.basename(self.binary).encode() in cmdline
        )
