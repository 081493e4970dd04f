"""The agent on its own runtime vs the image's python: boot to agent and exec latency of two builds of an image.

    .venv/bin/python -m bench.agent_runtime BASELINE_DIR CANDIDATE_DIR [--rounds N]

Each directory is a built image (BuiltImage: vmlinux, initramfs, rootfs, manifest), e.g. the default image built
before and after a change. Boots alternate between the two (baseline, candidate, baseline, ...) with the same qemu
command compute uses; each boot is timed from qemu's start to the agent's first answer, then its first exec and
`true` execs are timed on the raw agent channel. Prints one JSON object per line like bench/run.py; never fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.raw_vm import qemu_driver, raw_vm
from bench.run import emit, percentile
from images.builder import BuiltImage
from services.relay.agent_channel import AgentChannel, AgentTarget

EXECS = 30


async def boot_and_exec(image: BuiltImage, directory: Path) -> tuple[float, float, float, list[float]]:
    """Seconds from qemu's start to the agent's first pong, the first exec's seconds (`true`), the first exec of
    another program (`env`: the libc it loads is in the page cache by then), and `true` exec latencies."""
    _, driver = qemu_driver()
    vm = raw_vm(f"bench-{directory.name}", driver, image, directory)
    await driver.prepare_disk(image, directory)  # not timed: compute makes the overlay before it starts qemu
    started = time.perf_counter()
    pid = await driver.launch(vm, image, directory)
    channel = AgentChannel(AgentTarget(vm_id=vm.id, socket_path=str(driver.paths(directory)["agent"])))
    try:
        await channel.connect(5)
        await channel.wait_until_answering(120, interval=0.5)
        boot = time.perf_counter() - started
        started = time.perf_counter()
        frame = await channel.run_to_exit(["true"], 60)
        first_exec = time.perf_counter() - started
        assert frame.WhichOneof("body") == "exec_exited", frame
        started = time.perf_counter()
        await channel.run_to_exit(["env"], 60)
        second_program = time.perf_counter() - started
        latencies = []
        for _ in range(EXECS):
            started = time.perf_counter()
            await channel.run_to_exit(["true"], 60)
            latencies.append(time.perf_counter() - started)
        return boot, first_exec, second_program, latencies
    finally:
        await channel.close()
        os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_runtime")
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    images = {"baseline": BuiltImage.at(args.baseline), "candidate": BuiltImage.at(args.candidate)}
    figures: dict[str, dict[str, list[float]]] = {
        name: {"boot": [], "first": [], "second": [], "exec": []} for name in images
    }
    with tempfile.TemporaryDirectory(prefix="mvm-bench-rt-") as tmp:
        for round_number in range(args.rounds):
            order = list(images) if round_number % 2 == 0 else list(reversed(images))
            for name in order:
                directory = Path(tmp) / f"{name}{round_number}"
                directory.mkdir()
                boot, first, second, latencies = asyncio.run(boot_and_exec(images[name], directory))
                figures[name]["boot"].append(boot)
                figures[name]["first"].append(first)
                figures[name]["second"].append(second)
                figures[name]["exec"] += latencies
    base, new = figures["baseline"], figures["candidate"]
    emit("boot_to_agent_median", statistics.median(new["boot"]), "s", statistics.median(base["boot"]), "baseline image")
    emit("first_exec_median", statistics.median(new["first"]) * 1000, "ms", statistics.median(base["first"]) * 1000)
    emit("first_exec_other_program_median", statistics.median(new["second"]) * 1000, "ms",
         statistics.median(base["second"]) * 1000)  # fmt: skip
    emit("exec_true_p50", statistics.median(new["exec"]) * 1000, "ms", statistics.median(base["exec"]) * 1000)
    emit("exec_true_p90", percentile(new["exec"], 0.9) * 1000, "ms", percentile(base["exec"], 0.9) * 1000)
    for name, values in figures.items():
        print(f"# {name} boots: {', '.join(f'{v:.2f}' for v in values['boot'])}", flush=True)


if __name__ == "__main__":
    main()
