"""`make bench` (hostile part): what hostile guests cost their neighbours on the same relay.

- neighbour_exec_p99_under_flood: Exec(`echo`) p99 on a well-behaved guest (the agent engine on this host) while
  five hostile guests on the same relay flood their channels with frames for streams that do not exist, vs the
  same with no hostile guest, same run (goal: at most 2x). Each hostile channel is cut by its junk budget and
  not reconnected; the figure is the neighbour's latency through that.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.run import emit, percentile
from microvm.relay.v1 import relay_pb2
from services.common.registry import etcd_client
from services.common.settings import RelaySettings
from tests.etcd import LocalEtcd
from tests.fakes.hostile_guest import HostileGuest
from tests.unit.test_relay_with_host_agent import add_vm, run, serve_relay, start_agent

ROUNDS = 200


async def neighbour(relay) -> list[float]:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        await run(relay, ["echo", "fine"])
        samples.append(time.perf_counter() - started)
    return samples


async def measure(directory: Path, endpoint: str) -> tuple[list[float], list[float]]:
    client = etcd_client([endpoint])
    await client.connect()
    agent = await start_agent(str(directory / "agent.sock"))
    await add_vm(client, "bench", "host", str(directory / "agent.sock"))
    guests = []
    try:
        async with serve_relay(client, "bench", RelaySettings(), directory) as relay:
            await neighbour(relay)  # warm
            quiet = await neighbour(relay)
            for index in range(5):
                path = str(directory / f"hostile-{index}.sock")
                guests.append(await HostileGuest(path, "unknown-ids").start())
                await add_vm(client, "bench", f"hostile-{index}", path)
            waits = [
                asyncio.ensure_future(
                    relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id=f"hostile-{i}", timeout_ms=5000))
                )
                for i in range(5)
            ]
            flooded = await neighbour(relay)
            await asyncio.gather(*waits, return_exceptions=True)
            return quiet, flooded
    finally:
        for guest in guests:
            await guest.close()
        agent.kill()
        agent.wait()
        await client.close()


def main() -> None:
    directory = Path(tempfile.mkdtemp(prefix="mvm-bench-hostile-"))
    etcd = LocalEtcd(directory)
    try:
        quiet, flooded = asyncio.run(measure(directory, etcd.endpoint))
    finally:
        etcd.stop()
    emit(
        "neighbour_exec_p99_under_flood",
        percentile(flooded, 0.99) * 1000,
        "ms",
        percentile(quiet, 0.99) * 1000,
        "the same with no hostile guest",
        "ratio <= 2",
    )
    emit(
        "neighbour_exec_p50_under_flood",
        statistics.median(flooded) * 1000,
        "ms",
        statistics.median(quiet) * 1000,
        "the same with no hostile guest",
    )


if __name__ == "__main__":
    main()
