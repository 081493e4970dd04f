"""`make bench`: figures for the first sandbox, each beside a baseline measured in the same run.

Prints one JSON object per line: {"metric", "value", "unit", "baseline", "baseline_metric", "ratio", "goal"}.
Never fails on a figure: machines are noisy, the ratios are what to compare across runs.

- cold_create_to_first_output: CreateSandbox + Exec(echo) until the first stdout byte, through the gateway,
  vs the same qemu command started by hand until the agent first answers.
- exec_true_p50 / _p99: Exec(`true`) in a ready sandbox through the gateway, vs a bare ping round trip on
  the VM's virtio-serial agent channel.
- stream_throughput: `head -c 256M /dev/zero` streamed to the client through the gateway, vs the same
  command read straight off the agent channel.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from images.builder import BuiltImage
from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.agent_channel import AgentChannel, AgentTarget
from services.common.settings import ComputeSettings
from services.compute import hypervisor
from services.compute.qemu import QemuDriver
from services.compute.records import VmRecord
from tests.guests import Gateway
from tests.stack import start_stack

STREAM_BYTES = 256 << 20


def emit(metric: str, value: float, unit: str, baseline: float | None = None, baseline_metric: str = "",
         goal: str = "") -> None:
    ratio = round(value / baseline, 3) if baseline else None
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit,
                      "baseline": round(baseline, 4) if baseline is not None else None,
                      "baseline_metric": baseline_metric, "ratio": ratio, "goal": goal}), flush=True)


async def raw_boot(directory: Path) -> tuple[float, AgentChannel, int]:
    """Starts the same qemu command compute uses and times it to the agent's first answer."""
    settings = ComputeSettings()
    choice = hypervisor.choose("qemu", "auto", settings.qemu_binary, settings.cloud_hypervisor_binary)
    driver = QemuDriver(choice, settings.qemu_binary, settings.tcg_tb_size_mib)
    image = BuiltImage.load("default")
    vm = VmRecord(id="bench-raw", node="bench", template="default", image_dir=str(image.directory), vcpus=1,
                  memory_mib=256, hostname="bench-raw", vmm="qemu", accel=choice.accel, directory=str(directory))
    started = time.perf_counter()
    pid = await driver.launch(vm, image, directory)
    channel = AgentChannel(AgentTarget(vm_id=vm.id, socket_path=str(driver.paths(directory)["agent"])))
    await channel.connect(5)
    while True:
        try:
            await channel.ping(1.0)
            break
        except asyncio.TimeoutError:
            continue
    return time.perf_counter() - started, channel, pid


async def raw_ping_rtts(channel: AgentChannel, count: int) -> list[float]:
    rtts = []
    for _ in range(count):
        started = time.perf_counter()
        await channel.ping(5)
        rtts.append(time.perf_counter() - started)
    return rtts


async def raw_stream(channel: AgentChannel) -> float:
    stream = channel.open_stream()
    started = time.perf_counter()
    await stream.send(exec_start=agent_pb2.ExecStart(argv=["head", "-c", str(STREAM_BYTES), "/dev/zero"]))
    total = 0
    while True:
        frame = await stream.receive()
        kind = frame.WhichOneof("body")
        if kind == "output":
            total += len(frame.output.data)
            await stream.grant(len(frame.output.data))
        elif kind in ("exec_exited", "error"):
            break
    assert total == STREAM_BYTES, total
    return total / (time.perf_counter() - started) / 1e6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-") as tmp:
        stack = start_stack(Path(tmp) / "stack")
        gateway = Gateway(stack.gateway_address)
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        loop = asyncio.new_event_loop()
        try:
            # Cold create through the whole system, then the same boot by hand.
            started = time.perf_counter()
            sandbox = gateway.create()
            first_output = None
            for event in gateway.stub.Exec(api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(
                    argv=["echo", "hello"])), timeout=60):
                if event.stdout and first_output is None:
                    first_output = time.perf_counter() - started
            raw_boot_seconds, channel, raw_pid = loop.run_until_complete(raw_boot(raw_dir))
            emit("cold_create_to_first_output", first_output, "s", raw_boot_seconds,
                 "raw qemu boot to first agent answer", "ratio <= 1.1")

            # Exec latency vs bare channel round trip.
            for _ in range(5):
                gateway.exec(sandbox.name, ["true"])
            latencies = []
            for _ in range(100):
                t0 = time.perf_counter()
                gateway.exec(sandbox.name, ["true"])
                latencies.append(time.perf_counter() - t0)
            rtts = loop.run_until_complete(raw_ping_rtts(channel, 200))
            emit("exec_true_p50", statistics.median(latencies) * 1000, "ms", statistics.median(rtts) * 1000,
                 "virtio-serial echo p50", "p50 <= 30 ms")
            emit("exec_true_p99", percentile(latencies, 0.99) * 1000, "ms", percentile(rtts, 0.99) * 1000,
                 "virtio-serial echo p99")

            # Streaming throughput.
            t0 = time.perf_counter()
            total = 0
            for event in gateway.stub.Exec(api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(
                    argv=["head", "-c", str(STREAM_BYTES), "/dev/zero"])), timeout=600):
                total += len(event.stdout)
            gateway_mbps = total / (time.perf_counter() - t0) / 1e6
            raw_mbps = loop.run_until_complete(raw_stream(channel))
            emit("stream_throughput", gateway_mbps, "MB/s", raw_mbps, "same command off the raw agent channel",
                 ">= 40 MB/s")
            loop.run_until_complete(channel.close())
            import os
            import signal
            os.kill(raw_pid, signal.SIGKILL)
            gateway.delete(sandbox.name)
        finally:
            loop.close()
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
