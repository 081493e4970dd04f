"""The baselines of `make bench`: the same qemu command compute runs, started by hand, and its agent channel used
directly (no gateway, relay or etcd): a boot, ping round trips, a stream, and a migration-stream restore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from images.builder import BuiltImage
from microvm.agent.v1 import agent_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.settings import ComputeSettings
from services.compute import hypervisor
from services.compute.qemu import QemuDriver
from services.relay.agent_channel import AgentChannel, AgentTarget


def qemu_driver() -> tuple[ComputeSettings, QemuDriver]:
    """The QEMU driver compute would choose here, with its settings."""
    settings = ComputeSettings()
    choice = hypervisor.choose("qemu", "auto", settings.qemu_binary, settings.cloud_hypervisor_binary)
    return settings, QemuDriver(choice, settings.qemu_binary, settings.tcg_tb_size_mib, settings.aslr_for(choice.accel))


def raw_vm(vm_id: str, driver: QemuDriver, image: BuiltImage, directory: Path, **extra) -> VmRecord:
    """The record compute would write for a 1 vCPU, 256 MiB VM of `image` in `directory`."""
    return VmRecord(
        id=vm_id,
        node="bench",
        template=image.name,
        image_dir=str(image.directory),
        vcpus=1,
        memory_mib=256,
        hostname="bench-raw",
        vmm="qemu",
        accel=driver.accel,
        directory=str(directory),
        **extra,
    )


async def until_answering(vm_id: str, driver: QemuDriver, directory: Path, timeout: float = 120) -> AgentChannel:
    """The VM's agent channel, once the agent answered a ping."""
    channel = AgentChannel(AgentTarget(vm_id=vm_id, socket_path=str(driver.paths(directory)["agent"])))
    await channel.connect(5)
    await channel.wait_until_answering(timeout)
    return channel


async def raw_boot(directory: Path) -> tuple[float, AgentChannel, int]:
    """Starts the same qemu command compute uses and times it to the agent's first answer."""
    settings, driver = qemu_driver()
    image = BuiltImage.load("default")
    # The same command compute runs for a cold boot, RAM file in tmpfs included.
    ram_path = str(settings.ram_root(directory) / "bench-raw.ram")
    vm = raw_vm("bench-raw", driver, image, directory, ram_path=ram_path, ram_shared=True)
    Path(vm.ram_path).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pid = await driver.launch(vm, image, directory)
    channel = await until_answering(vm.id, driver, directory)
    return time.perf_counter() - started, channel, pid


async def raw_ping_rtts(channel: AgentChannel, count: int) -> list[float]:
    rtts = []
    for _ in range(count):
        started = time.perf_counter()
        await channel.ping(5)
        rtts.append(time.perf_counter() - started)
    return rtts


async def raw_stream(channel: AgentChannel, size: int) -> float:
    """`head -c size /dev/zero` read straight off the agent channel, granting as it reads: MB/s."""
    stream = channel.open_stream()
    started = time.perf_counter()
    await stream.send(exec_start=agent_pb2.ExecStart(argv=["head", "-c", str(size), "/dev/zero"]))
    total = 0
    while True:
        frame = await stream.receive()
        kind = frame.WhichOneof("body")
        if kind == "output":
            total += len(frame.output.data)
            await stream.grant(len(frame.output.data))
        elif kind in ("exec_exited", "error"):
            break
    assert total == size, total
    return total / (time.perf_counter() - started) / 1e6


async def raw_stream_restore(channel: AgentChannel, source_dir: Path, target_dir: Path) -> float:
    """Saves the raw VM's state as a migration stream, then times a fresh qemu `-incoming` restore of it."""
    from services.compute.qmp import QmpClient

    _, driver = qemu_driver()
    image = BuiltImage.load("default")
    state = source_dir / "state.bin"
    client = QmpClient(str(driver.paths(source_dir)["qmp"]))
    await client.connect()
    await client.execute("stop")
    await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    await client.execute("migrate", {"uri": f"exec:cat > {state}"})
    while (await client.execute("query-migrate")).get("status") != "completed":
        await asyncio.sleep(0.01)
    await client.close()
    await channel.close()
    frozen = source_dir / "frozen.qcow2"
    await (
        await asyncio.create_subprocess_exec(
            "qemu-img",
            "convert",
            "-U",
            "-O",
            "qcow2",
            "-B",
            str(image.rootfs),
            "-F",
            "raw",
            str(driver.paths(source_dir)["disk"]),
            str(frozen),
        )
    ).wait()
    await (
        await asyncio.create_subprocess_exec(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(frozen),
            "-F",
            "qcow2",
            str(driver.paths(target_dir)["disk"]),
        )
    ).wait()
    vm = raw_vm("bench-raw2", driver, image, target_dir)
    command = driver.command(vm, image, target_dir) + ["-incoming", f"exec:cat {state}"]
    started = time.perf_counter()
    await (await asyncio.create_subprocess_exec(*command)).wait()
    try:
        client = QmpClient(str(driver.paths(target_dir)["qmp"]))
        await client.connect()
        while (await client.execute("query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.005)
        await client.execute("cont")
        await client.close()
        restored = await until_answering(vm.id, driver, target_dir)
        elapsed = time.perf_counter() - started
        await restored.close()
    finally:  # the restored qemu is daemonized: nothing else stops it, whatever failed above
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(driver.paths(target_dir)["pid"].read_text()), signal.SIGKILL)
    return elapsed
