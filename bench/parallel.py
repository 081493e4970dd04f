"""`python -m bench.parallel [--sandboxes N] [--pool-size P]` (issue 19): N creates at once on one node with real
guests, each followed by an exec `true`, until all N answered; against one create + exec alone in the same run.

bench/cluster.py measures the same with the fake VMM across three nodes (the planes' own cost); this one is what a
burst costs on this host: the warm pool holds `--pool-size` guests (default: the node's default, 2), the rest
restore from the template's snapshot. A burst the pool covers is the setting a deployment expecting bursts
chooses (`compute.warm_pool_size`, about 44 MiB of host memory per pooled guest: bench/density.py).
One JSON row `parallel_creates_real_guests`, with each sandbox's own create→exec time (p50, max) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.run import wait_for_warm_pool
from services.common.records import VMS, Records
from services.compute import resource_sampler
from tests.guests import Gateway
from tests.stack import start_stack

DEFAULT_SANDBOXES = 20
DEFAULT_POOL = 2


def cpu_seconds(pid: int) -> float:
    try:
        return resource_sampler.cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return 0.0  # ended


def cpu_by_process(stack) -> tuple[dict[str, float], dict[int, tuple[str, float]]]:
    """CPU seconds used so far: by each service (and etcd) of the stack, and by each VMM (pid -> (sandbox or pool,
    seconds))."""
    children = json.loads((stack.state_dir / "supervisor.json").read_text())
    services = {name: cpu_seconds(entry["pid"]) for name, entry in children.items() if entry.get("pid")}

    async def vmms() -> list:
        client = stack.etcd_client()
        await client.connect()
        try:
            return [stored.message for stored in await Records(client).list(VMS) if stored.message.pid]
        finally:
            await client.close()

    return services, {vm.pid: ("pool" if vm.pooled else "sandbox", cpu_seconds(vm.pid)) for vm in asyncio.run(vmms())}


def cpu_used(before, after) -> dict[str, float]:
    """Seconds each service used between two `cpu_by_process` readings, and the VMMs' summed by what they were at
    the end (a claimed pool VM counts as its sandbox's all along)."""
    totals = {name: seconds - before[0].get(name, 0.0) for name, seconds in after[0].items()}
    for pid, (kind, seconds) in after[1].items():
        earlier = before[1].get(pid, ("", 0.0))[1]
        totals[f"{kind}_vmms"] = totals.get(f"{kind}_vmms", 0.0) + seconds - earlier
    return {name: round(seconds, 2) for name, seconds in sorted(totals.items())}


def create_and_exec(gateway: Gateway) -> tuple[str, float]:
    started = time.perf_counter()
    sandbox = gateway.create()
    gateway.exec(sandbox.name, ["true"])
    return sandbox.name, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=DEFAULT_SANDBOXES)
    parser.add_argument("--pool-size", type=int, default=DEFAULT_POOL)
    args = parser.parse_args()
    count, pool_size = max(1, args.sandboxes), max(0, args.pool_size)
    with tempfile.TemporaryDirectory(prefix="mvm-bench-parallel-") as tmp:
        # Admission room, not the host's: the burst is what is measured.
        compute = {"vcpus_total": 4 * count, "memory_mib_total": 65536, "warm_pool_size": pool_size}
        stack = start_stack(Path(tmp) / "stack", extra_config={"compute": compute})
        try:
            gateway = Gateway(stack.gateway_address, stack.admin_key)
            ready = pool_size
            wait_for_warm_pool(stack, timeout=60 + 10 * pool_size, pooled_vms=ready)
            alone_name, alone = create_and_exec(gateway)
            gateway.delete(alone_name)
            wait_for_warm_pool(stack, timeout=60 + 10 * pool_size, pooled_vms=ready)
            cpu_before = cpu_by_process(stack)
            started = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                results = list(pool.map(lambda _: create_and_exec(gateway), range(count)))
            total = time.perf_counter() - started
            cpu_after = cpu_by_process(stack)
            each = [seconds for _, seconds in results]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda result: gateway.delete(result[0]), results))
            row = {
                "metric": "parallel_creates_real_guests",
                "value": round(total, 3),
                "unit": "s",
                "baseline": round(alone, 3),
                "baseline_metric": "one warm create + exec alone, same run",
                "ratio": round(total / alone, 2),
                "goal": f"all {count} answering exec within 2 s",
                "sandboxes": count,
                "warm_pool_size": pool_size,
                "each_p50_s": round(statistics.median(each), 3),
                "each_max_s": round(max(each), 3),
                # Where the burst's CPU went (2 cores: at most 2 s of CPU per second), the refilling pool's included.
                "cpu_seconds": cpu_used(cpu_before, cpu_after),
            }
            print(json.dumps(row), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
