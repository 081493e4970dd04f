"""The Cloud Hypervisor driver: one `cloud-hypervisor --api-socket` process per VM, driven over its REST API.

Written against Cloud Hypervisor's own OpenAPI spec (tests validate every request body the driver builds
against it, and every endpoint it calls must exist there). The guest boots the same template as under QEMU:
the ELF vmlinux through PVH (Cloud Hypervisor's direct kernel boot; no firmware needed), virtio-pci devices,
and the agent channel over virtio-vsock in hybrid mode: the host connects to the `--vsock` unix socket and
writes `CONNECT <port>\\n`. The serial console is served on a unix socket (mode `Socket`) that compute drains into
a bounded log (services/compute/console.py); while nobody is connected Cloud Hypervisor keeps its newest 1 MiB.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from images.builder import BuiltImage
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import FailedPrecondition, Unavailable
from services.compute.disks import create_overlay, freeze
from services.compute.hypervisor import HypervisorChoice

KERNEL_ARGS = (
    "console=ttyS0 quiet panic=-1 reboot=k cryptomgr.notests=1 mitigations=off audit=0 "
    "random.trust_cpu=on apparmor=0 rootwait"
)
AGENT_VSOCK_PORT = 1024
GUEST_CID = 3
# Every (method, endpoint) the driver calls; the contract test checks each against the spec.
ENDPOINTS = {
    ("GET", "vmm.ping"),
    ("PUT", "vmm.shutdown"),
    ("PUT", "vm.create"),
    ("PUT", "vm.boot"),
    ("PUT", "vm.pause"),
    ("PUT", "vm.resume"),
    ("PUT", "vm.shutdown"),
    ("GET", "vm.info"),
    ("GET", "vm.counters"),
    ("PUT", "vm.resize"),
    ("PUT", "vm.snapshot"),
    ("PUT", "vm.restore"),
    ("PUT", "vm.delete"),
}


class CloudHypervisorError(FailedPrecondition):
    default_reason = "VMM_ERROR"


class ChApi:
    """HTTP/1.1 over the VMM's unix API socket, one request per connection."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def request(self, method: str, endpoint: str, body: dict | None = None) -> Any:
        if (method, endpoint) not in ENDPOINTS:
            raise ValueError(f"{method} {endpoint} is not an endpoint this driver is allowed to call")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path), self.timeout)
        except (TimeoutError, OSError) as exc:
            raise Unavailable(
                f"Cloud Hypervisor API at {self.socket_path} is unreachable: {exc}", reason="VMM_UNAVAILABLE"
            ) from None
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            head = [
                f"{method} /api/v1/{endpoint} HTTP/1.1",
                "Host: localhost",
                "Accept: application/json",
                f"Content-Length: {len(payload)}",
                "Connection: close",
            ]
            if body is not None:
                head.append("Content-Type: application/json")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), self.timeout)
            parts = status_line.decode(errors="replace").split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise Unavailable(f"Cloud Hypervisor sent a malformed reply: {status_line!r}", reason="VMM_UNAVAILABLE")
            status = int(parts[1])
            length = None
            while (line := await asyncio.wait_for(reader.readline(), self.timeout)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode(errors="replace").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            data = await asyncio.wait_for(
                reader.readexactly(length) if length is not None else reader.read(), self.timeout
            )
        finally:
            writer.close()
        if status >= 300:
            message = data.decode(errors="replace").strip() or f"HTTP {status}"
            raise CloudHypervisorError(
                f"Cloud Hypervisor refused {method} {endpoint}: {message}", metadata={"http_status": str(status)}
            )
        return json.loads(data) if data.strip() else None

    # One method per endpoint, named after it.
    async def ping(self) -> dict:
        return await self.request("GET", "vmm.ping")

    async def create(self, config: dict) -> None:
        await self.request("PUT", "vm.create", config)

    async def boot(self) -> None:
        await self.request("PUT", "vm.boot")

    async def pause(self) -> None:
        await self.request("PUT", "vm.pause")

    async def resume(self) -> None:
        await self.request("PUT", "vm.resume")

    async def info(self) -> dict:
        return await self.request("GET", "vm.info")

    async def counters(self) -> dict:
        return await self.request("GET", "vm.counters")

    async def resize(self, vcpus: int | None = None, ram_bytes: int | None = None) -> None:
        body: dict[str, int] = {}
        if vcpus is not None:
            body["desired_vcpus"] = vcpus
        if ram_bytes is not None:
            body["desired_ram"] = ram_bytes
        await self.request("PUT", "vm.resize", body)

    async def snapshot(self, destination: Path) -> None:
        await self.request("PUT", "vm.snapshot", {"destination_url": f"file://{destination}"})

    async def restore(self, source: Path) -> None:
        await self.request("PUT", "vm.restore", {"source_url": f"file://{source}", "prefault": False})

    async def shutdown(self) -> None:
        await self.request("PUT", "vm.shutdown")

    async def delete(self) -> None:
        await self.request("PUT", "vm.delete")

    async def shutdown_vmm(self) -> None:
        await self.request("PUT", "vmm.shutdown")


class CloudHypervisorDriver:
    agent_transport = "hybrid-vsock"
    # Its snapshots copy all of RAM: restoring one is no cheaper than the pool would need. Cold boots under
    # KVM take a fraction of a second anyway.
    supports_template_snapshots = False
    disk_format = "qcow2"
    machine = "cloud-hypervisor-1"

    def __init__(self, choice: HypervisorChoice, binary: str, aslr: bool = True) -> None:
        self.name = "cloud-hypervisor"
        self.accel = choice.accel
        self.binary = binary
        self.boot_args = KERNEL_ARGS + ("" if aslr else " norandmaps")

    @staticmethod
    def paths(directory: Path) -> dict[str, Path]:
        return {
            "disk": directory / "disk.qcow2",
            "agent": directory / "vsock.sock",
            "api": directory / "api.sock",
            "console": directory / "console.sock",
            "pid": directory / "vmm.pid",
            "log": directory / "vmm.log",
        }

    def api(self, directory: Path) -> ChApi:
        return ChApi(str(self.paths(directory)["api"]))

    def vm_config(self, vm: VmRecord, image: BuiltImage, directory: Path) -> dict:
        """The VmConfig body of vm.create for this VM."""
        p = self.paths(directory)
        memory: dict[str, Any] = {"size": vm.memory_mib << 20}
        if vm.ram_path and vm.ram_shared:
            memory["shared"] = True
        config: dict[str, Any] = {
            "cpus": {"boot_vcpus": vm.vcpus, "max_vcpus": vm.vcpus},
            "memory": memory,
            "payload": {
                "kernel": str(image.kernel),
                "initramfs": str(image.initramfs),
                "cmdline": f"{self.boot_args} mvm.hostname={vm.boot_hostname or vm.hostname}",
            },
            "disks": [{"path": str(p["disk"]), "image_type": "Qcow2", "backing_files": True}],
            "rng": {"src": "/dev/urandom"},
            "serial": {"mode": "Socket", "socket": str(p["console"])},
            "console": {"mode": "Off"},
            "vsock": {"cid": GUEST_CID, "socket": str(p["agent"])},
        }
        if vm.nic.tap_device:
            # The network service's persistent TAP; no `ip`/`mask`: the host side stays a bare bridge port.
            config["net"] = [{"tap": vm.nic.tap_device, "mac": vm.nic.mac_address, "num_queues": 2}]
        return config

    async def _spawn(self, directory: Path) -> int:
        p = self.paths(directory)
        p["api"].unlink(missing_ok=True)
        log = open(p["log"], "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                "--api-socket",
                f"path={p['api']}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=str(directory),
            )
        except FileNotFoundError:
            raise FailedPrecondition(f"{self.binary!r} is not installed", reason="VMM_MISSING") from None
        finally:
            log.close()
        p["pid"].write_text(str(process.pid))
        api = self.api(directory)
        for _ in range(200):
            if process.returncode is not None:
                raise FailedPrecondition(
                    f"cloud-hypervisor exited with {process.returncode}: "
                    f"{p['log'].read_text(errors='replace')[-1000:]}",
                    reason="VMM_START_FAILED",
                )
            try:
                await api.ping()
                return process.pid
            except Unavailable:
                await asyncio.sleep(0.02)
        raise FailedPrecondition("cloud-hypervisor's API socket never answered", reason="VMM_START_FAILED")

    async def prepare_disk(
        self, image: BuiltImage, directory: Path, backing: Path | None = None, backing_format: str = "raw"
    ) -> None:
        await create_overlay(backing or image.rootfs, backing_format, self.paths(directory)["disk"])

    async def launch(self, vm: VmRecord, image: BuiltImage, directory: Path, incoming: bool = False) -> int:
        if not self.paths(directory)["disk"].exists():
            await self.prepare_disk(image, directory)
        pid = await self._spawn(directory)
        api = self.api(directory)
        await api.create(self.vm_config(vm, image, directory))
        await api.boot()
        return pid

    async def pause(self, directory: Path) -> None:
        await self.api(directory).pause()

    async def resume(self, directory: Path) -> None:
        await self.api(directory).resume()

    async def status(self, directory: Path) -> str:
        state = (await self.api(directory).info())["state"]
        if state not in ("Running", "Paused"):
            raise Unavailable(f"the VM is {state}", reason="VMM_UNAVAILABLE")
        return "running" if state == "Running" else "paused"

    async def snapshot(self, vm: VmRecord, out: Path, base_image: Path) -> str:
        directory = Path(vm.directory)
        api = self.api(directory)
        was_running = await self.status(directory) == "running"
        if was_running:
            await api.pause()
        try:
            (out / "ch").mkdir()
            await api.snapshot(out / "ch")
            # One file for the store: config.json, state.json and memory-ranges of the VMM's snapshot.
            await asyncio.to_thread(_pack, out / "ch", out / "vmm-state.tar")
            await freeze(self.paths(directory)["disk"], base_image, out / "disk.qcow2")
        finally:
            if was_running:
                await api.resume()
        return "cloud-hypervisor"

    async def restore(self, vm: VmRecord, image: BuiltImage, directory: Path, frozen: Path) -> int:
        """Restores into a new VMM; the snapshot's config is rewritten to this VM's own disk and sockets."""
        await self.prepare_disk(image, directory, backing=frozen / "disk.qcow2", backing_format="qcow2")
        source = directory / "restore"
        await asyncio.to_thread(_unpack, frozen / "vmm-state.tar", source)
        config = json.loads((source / "config.json").read_text())
        p = self.paths(directory)
        config["disks"][0]["path"] = str(p["disk"])
        config["vsock"]["socket"] = str(p["agent"])
        config["serial"] = {k: v for k, v in config.get("serial", {}).items() if k != "file"}  # a snapshot's may
        config["serial"].update(mode="Socket", socket=str(p["console"]))
        for net in config.get("net") or []:
            net["tap"], net["mac"] = vm.nic.tap_device, vm.nic.mac_address  # the clone's own attachment
        (source / "config.json").write_text(json.dumps(config))
        pid = await self._spawn(directory)
        api = self.api(directory)
        await api.restore(source)
        await api.resume()
        return pid

    async def share_memory(self, frozen: Path, vm: VmRecord, image: BuiltImage, work: Path) -> bool:
        return False  # its snapshot's memory ranges are restored as they are

    def owns_process(self, pid: int, directory: Path) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.paths(directory)["api"]).encode() in cmdline


def _pack(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for item in sorted(directory.iterdir()):
            tar.add(item, arcname=item.name)
    shutil.rmtree(directory)


def _unpack(archive: Path, directory: Path) -> None:
    directory.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
