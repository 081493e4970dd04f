"""`python -m bench.density [--sandboxes N]` (issue 19): how many idle sandboxes this host holds, and what each costs.

A stack of its own; N idle default sandboxes (default 50, at most 200) created one after another. One JSON row
`density`: value = host memory per sandbox in MiB (the PSS of its VMM process, plus the services' resident growth
divided among the sandboxes); baseline = the guest's own memory size (what a sandbox may use); also the exec
`true` p50 in the first sandbox before the others exist and after they all do, and the create rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.run import pss_kib, wait_for_warm_pool
from services.common.records import VMS, Records
from tests.guests import Gateway
from tests.stack import start_stack

DEFAULT_SANDBOXES = 50
MAX_SANDBOXES = 200
EXEC_SAMPLES = 30


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def services_rss_kib(stack) -> dict[str, int]:
    """Resident memory of each of the stack's service processes (not etcd's or the VMs')."""
    children = json.loads((stack.state_dir / "supervisor.json").read_text())
    return {name: rss_kib(entry["pid"]) for name, entry in children.items() if name in stack.kinds}


def vmm_pss_kib(stack) -> list[tuple[str, int]]:
    """(how it started, PSS) of each sandbox's VMM (not the warm pool's), from the VM records compute keeps."""

    async def sandboxes() -> list:
        client = stack.etcd_client()
        await client.connect()
        try:
            return [s.message for s in await Records(client).list(VMS) if not s.message.pooled and s.message.pid]
        finally:
            await client.close()

    sizes = []
    for vm in asyncio.run(sandboxes()):
        try:
            sizes.append((vm.start_method, pss_kib(vm.pid)))
        except (OSError, ValueError):
            pass
    return sizes


def by_start_method(sizes: list[tuple[str, int]]) -> dict[str, dict]:
    """Count, p50 and mean PSS (MiB) per start method: a warm-pool claim and a template-snapshot restore differ."""
    methods: dict[str, list[int]] = {}
    for method, kib in sizes:
        methods.setdefault(method, []).append(kib)
    return {
        method: {
            "count": len(values),
            "p50": round(statistics.median(values) / 1024, 1),
            "mean": round(statistics.mean(values) / 1024, 1),
        }
        for method, values in sorted(methods.items())
    }


def ksm_state() -> str:
    """Whether the host merges identical pages (a host setting, off by default): it changes what PSS counts."""
    try:
        run = Path("/sys/kernel/mm/ksm/run").read_text().strip()
        shared = int(Path("/sys/kernel/mm/ksm/pages_sharing").read_text())
    except (OSError, ValueError):
        return "unknown"
    return f"on ({shared * 4 // 1024} MiB shared)" if run == "1" else "off"


def exec_p50_ms(gateway, name: str) -> float:
    took = []
    for _ in range(EXEC_SAMPLES):
        started = time.perf_counter()
        gateway.exec(name, ["true"])
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=DEFAULT_SANDBOXES, help=f"1..{MAX_SANDBOXES}")
    parser.add_argument("--tb-size-mib", type=int, default=0, help="compute.tcg_tb_size_mib (0: the default)")
    parser.add_argument(
        "--settle-seconds", type=float, default=10, help="idle time before measuring (KSM, where on, needs minutes)"
    )
    args = parser.parse_args()
    count = max(1, min(MAX_SANDBOXES, args.sandboxes))
    with tempfile.TemporaryDirectory(prefix="mvm-bench-density-") as tmp:
        room = {"compute": {"vcpus_total": 4 * MAX_SANDBOXES, "memory_mib_total": 262144}}  # admission, not the host
        if args.tb_size_mib:
            room["compute"]["tcg_tb_size_mib"] = args.tb_size_mib
        stack = start_stack(Path(tmp) / "stack", extra_config=room)
        try:
            gateway = Gateway(stack.gateway_address, stack.admin_key)
            wait_for_warm_pool(stack)
            services_before = services_rss_kib(stack)
            first = gateway.create()
            for _ in range(5):
                gateway.exec(first.name, ["true"])
            exec_before = exec_p50_ms(gateway, first.name)
            started = time.perf_counter()
            for _ in range(count - 1):
                gateway.create()
            create_rate = (count - 1) / (time.perf_counter() - started) if count > 1 else 0.0
            time.sleep(args.settle_seconds)  # settled: the pool refilled, the guests idle
            exec_after = exec_p50_ms(gateway, first.name)
            started_as = vmm_pss_kib(stack)
            vmm = [kib for _, kib in started_as]
            services_after = services_rss_kib(stack)
            growth_by_service = {name: after - services_before.get(name, 0) for name, after in services_after.items()}
            growth = max(0, sum(growth_by_service.values()))
            per_sandbox_mib = (sum(vmm) + growth) / max(1, len(vmm)) / 1024
            row = {
                "metric": "density",
                "value": round(per_sandbox_mib, 1),
                "unit": "MiB per sandbox",
                "baseline": first.memory_mib,
                "baseline_metric": "guest memory size (MiB)",
                "ratio": round(per_sandbox_mib / first.memory_mib, 3),
                "goal": "<= 40 MiB per idle sandbox; 200 on this host",
                "sandboxes": len(vmm),
                "tcg_tb_size_mib": args.tb_size_mib or "default",
                "host_ksm": ksm_state(),
                "vmm_pss_mib_p50": round(statistics.median(vmm) / 1024, 1) if vmm else None,
                "services_growth_mib": round(growth / 1024, 1),
                "services_growth_mib_by_service": {k: round(v / 1024, 1) for k, v in sorted(growth_by_service.items())},
                "vmm_pss_mib_mean": round(statistics.mean(vmm) / 1024, 1) if vmm else None,
                "vmm_pss_mib_by_start_method": by_start_method(started_as),
                "exec_p50_ms_first": round(exec_before, 2),
                "exec_p50_ms_last": round(exec_after, 2),
                "creates_per_second": round(create_rate, 2),
            }
            print(json.dumps(row), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
