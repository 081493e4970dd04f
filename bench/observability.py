"""`make bench` (issue 18): what metrics and tracing cost.

Stacks of its own, one after another (never two up at once: this host has 2 cores): off, on, off again (the
baseline pools both off runs, so neither place in the order favours a side).

- "off": `metrics_listen: ""` (no service serves /metrics) and `trace_exporter: off` (no tracer provider: spans
  are no-ops);
- "on": the defaults (every service serves /metrics, spans recorded) plus `trace_exporter: otlp` to an OTLP
  collector in this process, so every span is exported too.

Rows (bench/run.py's shape):

- exec_true_p50_observability_on: Exec(`true`) p50 of EXEC_CALLS in one sandbox (after warm-up, the warm pool
  refilled and SETTLE_SECONDS) on "on", baseline the same on both "off" stacks; goal ratio <= 1.05. Printed last.
- metrics_scrape_p50: on "on", GET /metrics of every service SCRAPES times with no sandbox, then again with
  SANDBOXES idle default sandboxes (fewer if creating them takes more than CREATE_BUDGET_SECONDS; the row says how
  many; scraped once the warm pool has refilled and SETTLE_SECONDS passed); the row is the largest exposition (by
  bytes), baseline its p50 with no sandbox.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from bench.breakdown import Collector
from bench.run import wait_for_warm_pool
from tests.guests import Gateway
from tests.stack import start_stack

EXEC_CALLS = 100
WARMUP_CALLS = 10
SANDBOXES = 100
CREATE_BUDGET_SECONDS = 180.0
SCRAPES = 20
SETTLE_SECONDS = 10
ROOM = {"compute": {"vcpus_total": 800, "memory_mib_total": 262144}}  # admission, not the host


def exec_samples_ms(stack, gateway: Gateway) -> list[float]:
    """EXEC_CALLS Exec(`true`) in a new sandbox, once the warm pool has refilled behind it and the host settled."""
    name = gateway.create().name
    for _ in range(WARMUP_CALLS):
        gateway.exec(name, ["true"])
    wait_for_warm_pool(stack)  # the create took a pooled VM; its replacement boots (under TCG, on these cores)
    time.sleep(SETTLE_SECONDS)
    took = []
    for _ in range(EXEC_CALLS):
        started = time.perf_counter()
        gateway.exec(name, ["true"])
        took.append((time.perf_counter() - started) * 1000)
    return took


def metrics_endpoints(stack) -> dict[str, str]:
    """Each registered service's /metrics address (from its registration's metadata), by kind."""
    return {i.kind: i.metadata["metrics"] for i in stack.registered() if i.metadata.get("metrics")}


def scrape(endpoints: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Each service's GET /metrics p50 in ms of SCRAPES, and the size of its last answer in bytes."""
    results = {}
    for kind, address in sorted(endpoints.items()):
        took, size = [], 0
        for _ in range(SCRAPES):
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
                size = len(response.read())
            took.append((time.perf_counter() - started) * 1000)
        results[kind] = (statistics.median(took), size)
    return results


def run_off() -> list[float]:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-observability-off-") as tmp:
        config = {**ROOM, "metrics_listen": "", "trace_exporter": "off"}
        stack = start_stack(Path(tmp) / "stack", extra_config=config)
        try:
            gateway = Gateway(stack.gateway_address, stack.admin_key)
            wait_for_warm_pool(stack)
            return exec_samples_ms(stack, gateway)
        finally:
            stack.stop()


def run_on(collector_port: int) -> list[float]:
    """The exec samples of the "on" stack; prints the scrape row."""
    with tempfile.TemporaryDirectory(prefix="mvm-bench-observability-on-") as tmp:
        config = {**ROOM, "trace_exporter": "otlp", "otlp_endpoint": f"127.0.0.1:{collector_port}"}
        stack = start_stack(Path(tmp) / "stack", extra_config=config)
        try:
            gateway = Gateway(stack.gateway_address, stack.admin_key)
            wait_for_warm_pool(stack)
            endpoints = metrics_endpoints(stack)
            empty = scrape(endpoints)  # before any sandbox
            on = exec_samples_ms(stack, gateway)
            created, started = 1, time.perf_counter()
            while created < SANDBOXES and time.perf_counter() - started < CREATE_BUDGET_SECONDS:
                gateway.create()
                created += 1
            create_seconds = time.perf_counter() - started
            wait_for_warm_pool(stack)  # the pool refilled behind the last create and the host settled, as before
            time.sleep(SETTLE_SECONDS)
            full = scrape(metrics_endpoints(stack))
            largest = max(full, key=lambda kind: full[kind][1])
            p50, size = full[largest]
            goal = f"largest /metrics with {SANDBOXES} sandboxes"
            if created < SANDBOXES:
                goal += f" (only {created}: creating them took over {CREATE_BUDGET_SECONDS:.0f} s here)"
            row = {
                "metric": "metrics_scrape_p50",
                "value": round(p50, 4),
                "unit": "ms",
                "baseline": round(empty[largest][0], 4),
                "baseline_metric": f"{largest} /metrics p50 with no sandbox ({empty[largest][1]} bytes)",
                "ratio": round(p50 / empty[largest][0], 3),
                "goal": goal,
                "service": largest,
                "bytes": size,
                "bytes_no_sandbox": empty[largest][1],
                "sandboxes": created,
                "create_seconds": round(create_seconds, 1),
                "scrapes": SCRAPES,
                "all_services": {kind: {"p50_ms": round(v[0], 2), "bytes": v[1]} for kind, v in full.items()},
            }
            print(json.dumps(row), flush=True)
            return on
        finally:
            stack.stop(timeout=120)


def main() -> None:
    off_before = run_off()
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        on = run_on(port)
    finally:
        server.stop(0)
    with collector.lock:
        exported = sum(len(spans) for spans in collector.spans.values())
    time.sleep(SETTLE_SECONDS)  # the on stack's sandboxes gone
    off_after = run_off()
    on_p50, off_p50 = statistics.median(on), statistics.median(off_before + off_after)
    row = {
        "metric": "exec_true_p50_observability_on",
        "value": round(on_p50, 4),
        "unit": "ms",
        "baseline": round(off_p50, 4),
        "baseline_metric": "exec_true_p50 with metrics_listen '' and trace_exporter off (both off stacks)",
        "ratio": round(on_p50 / off_p50, 3),
        "goal": "ratio <= 1.05",
        "calls": EXEC_CALLS,
        "off_p50_ms_before": round(statistics.median(off_before), 2),
        "off_p50_ms_after": round(statistics.median(off_after), 2),
        "spans_exported": exported,
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
