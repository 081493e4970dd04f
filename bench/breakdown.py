"""`make bench` (issue 19): where the milliseconds of an exec and of a warm create go, hop by hop, from the spans of
the calls themselves.

A stack of its own exports every service's spans by OTLP to a collector in this process (the services' real
`trace_exporter: otlp`). For each of N Exec(`true`) calls the trace gives: the gateway's server span, its client
spans to auth and to the relay, the relay's server span, and the guest's own part (`guest.exec.spawn`, from the
times the agent reports). Each hop's p50 is a row whose baseline is the client's p50 total (ratio: its share):

    client -> gateway         client total - gateway server span (the client's gRPC and the wire both ways)
    gateway                   gateway server span - its client spans to auth and relay (checks, routing, streaming)
    auth                      the gateway's Authenticate calls (the caller's credential checked by auth)
    audit_record_in_path      its RecordAuditEvent calls within its server span; audit_record_after: the rest (after
                              the `exited` event the client measures; the stream's final status waits for it)
    gateway -> relay          gateway's client span to the relay - the relay's server span
    relay                     relay server span - the path below (its own work: stream, frames, events)
    agent channel -> guest    the relay sending ExecStart to the agent taking it (virtio-serial under TCG)
    guest spawn               the agent taking the frame to the process spawned
    guest process run         spawned to reaped by the agent (`true` itself: exec, run, exit)
    guest finish              reaped to ExecExited queued (the agent draining the pipes, closing, encoding)
    agent channel -> host     ExecExited queued in the guest to the relay reading it
(The guest's times are its own clock, which the relay keeps set from the host's: a one-way channel figure is as
good as that sync, about a millisecond.)

The row `exec_vs_spawn_floor` is the client's p50 against the floor measured inside the same guest in the same
run: posix_spawn("/bin/true") and wait, p50 of 200. A warm create gets the same treatment: its spans by name, and
its first command's hops (`warm_create_first_exec_hop_*`) against the same hops' p50 later in that sandbox. (Right
after a claim the relay's sync of the guest clock is new: the one-way guest figures of that first command are rough.)
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.run import emit, wait_for_warm_pool
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.guests import Gateway
from tests.stack import start_stack

CALLS = 200
FORK_COUNT = 10
FLUSH_SECONDS = 8.0  # the services export in batches every 5 s
SPAWN_FLOOR = """
import os, time, statistics
samples = []
for _ in range(200):
    t = time.perf_counter()
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    os.waitpid(pid, 0)
    samples.append(time.perf_counter() - t)
print(statistics.median(samples) * 1000)
"""


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: every span, by trace id."""

    def __init__(self) -> None:
        self.spans: dict[bytes, list] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans[span.trace_id].append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()


def ms(span) -> float:
    return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6


def within(child, parent) -> float:
    """The milliseconds of `child` that fall inside `parent`."""
    start = max(child.start_time_unix_nano, parent.start_time_unix_nano)
    end = min(child.end_time_unix_nano, parent.end_time_unix_nano)
    return max(0, end - start) / 1e6


# The guest's part of an exec, in order (services/relay/processes.py makes these spans from the agent's times).
GUEST_PATH = (
    ("agent_channel_to_guest", "agent_channel.to_guest"),
    ("guest_spawn", "guest.exec.spawn"),
    ("guest_process_run", "guest.exec.run"),
    ("guest_finish", "guest.exec.finish"),
    ("agent_channel_to_host", "agent_channel.to_host"),
)


def exec_hops(spans: list, client_ms: float) -> dict[str, float] | None:
    """The hops of one Exec trace, or None when the trace is incomplete."""

    def find(service: str, name: str, kind: int) -> list:
        return [s for who, s in spans if who == service and s.name == name and s.kind == kind]

    server, client = 2, 3  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT
    exec_name = "/microvm.sandbox.v1.SandboxService/Exec"
    gateway = find("microvm-gateway", exec_name, server)
    to_relay = find("microvm-gateway", exec_name, client)
    relay = find("microvm-relay", exec_name, server)
    auth = find("microvm-gateway", "/microvm.auth.v1.AuthService/Authenticate", client)
    audit = find("microvm-gateway", "/microvm.auth.v1.AuthService/RecordAuditEvent", client)
    guest = {
        hop: [
            s for _, s in spans if s.name == name and all(a.value.string_value != "exec_started" for a in s.attributes)
        ]
        for hop, name in GUEST_PATH
    }
    if not (gateway and to_relay and relay and all(guest.values())):
        return None
    # Only what lies within the gateway's own span delays the caller (the audit entry is written after it).
    auth_ms, audit_ms = sum(within(s, gateway[0]) for s in auth), sum(within(s, gateway[0]) for s in audit)
    path = {hop: ms(found[0]) for hop, found in guest.items()}
    return {
        "client_to_gateway": client_ms - ms(gateway[0]),
        "gateway": ms(gateway[0]) - within(to_relay[0], gateway[0]) - auth_ms - audit_ms,
        "auth": auth_ms,
        "audit_record_in_path": audit_ms,
        "audit_record_after": sum(ms(s) for s in audit) - audit_ms,
        "gateway_to_relay": ms(to_relay[0]) - ms(relay[0]),
        "relay": ms(relay[0]) - sum(path.values()),
        **path,
    }


def create_hops(spans: list) -> dict[str, float]:
    """A warm create's spans by service and name (the server side of each call, and our own internal spans such as
    the relay's `agent_channel.open`), in ms."""
    ours = [(who, s) for who, s in spans if s.kind == 2 or (s.kind == 1 and "." in s.name and "/" not in s.name)]
    return {f"{who.removeprefix('microvm-')} {s.name.rsplit('/', 1)[-1]}": ms(s) for who, s in ours}


def main() -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="mvm-bench-breakdown-") as tmp:
            stack = start_stack(
                Path(tmp) / "stack", extra_config={"trace_exporter": "otlp", "otlp_endpoint": f"127.0.0.1:{port}"}
            )
            try:
                run(stack, collector)
            finally:
                stack.stop()
    finally:
        server.stop(0)


def run(stack, collector: Collector) -> None:
    gateway = Gateway(stack.gateway_address, stack.admin_key)
    wait_for_warm_pool(stack)
    with collector.lock:
        collector.spans.clear()
    started = time.perf_counter()
    sandbox = gateway.create()
    created = time.perf_counter()
    gateway.exec(sandbox.name, ["true"])
    create_ms = (time.perf_counter() - started) * 1000
    first_exec_ms = (time.perf_counter() - created) * 1000
    time.sleep(FLUSH_SECONDS)
    with collector.lock:
        create_traces = set(collector.spans)
    for _ in range(5):
        gateway.exec(sandbox.name, ["true"])
    totals = []
    timed_from = time.time_ns()  # the services' spans carry the same host clock
    for _ in range(CALLS):
        t0 = time.perf_counter()
        gateway.exec(sandbox.name, ["true"])
        totals.append((time.perf_counter() - t0) * 1000)
    timed_until = time.time_ns()
    floor = float(gateway.exec(sandbox.name, ["python3", "-c", SPAWN_FLOOR]).stdout.decode().strip())
    sdk_vs_raw(gateway, stack.gateway_address, sandbox.name)
    time.sleep(FLUSH_SECONDS)
    exec_name = "/microvm.sandbox.v1.SandboxService/Exec"

    def began(spans) -> int:
        return min(s.start_time_unix_nano for who, s in spans if who == "microvm-gateway" and s.name == exec_name)

    with collector.lock:
        traces = [
            spans
            for trace_id, spans in collector.spans.items()
            if trace_id not in create_traces and any(s.name == "guest.exec.spawn" for _, s in spans)
        ]
    # The timed calls are one after another: the traces that began while they ran, in the order they began (the
    # floor's exec and the SDK comparison's calls come after).
    timed = sorted((t for t in traces if timed_from <= began(t) <= timed_until), key=began)
    assert len(timed) == CALLS, f"{len(timed)} traces of {CALLS} timed calls"
    client_p50 = statistics.median(totals)
    hops = collections.defaultdict(list)
    for spans, client_ms in zip(timed, totals, strict=False):
        for hop, value in (exec_hops(spans, client_ms) or {}).items():
            hops[hop].append(value)
    emit("exec_vs_spawn_floor", client_p50, "ms", floor, "posix_spawn /bin/true p50 in the same guest", "+3 ms")
    for hop, values in hops.items():
        emit(f"exec_hop_{hop}", statistics.median(values), "ms", client_p50, "exec_true_client_p50", "")
    tail_hops(timed, totals)
    create_spans: list = []
    for trace_id in create_traces:
        if any(s.name.endswith("/CreateSandbox") for _, s in collector.spans[trace_id]):
            create_spans = collector.spans[trace_id]
    create = "CreateSandbox"
    for name, value in sorted(create_hops(create_spans).items(), key=lambda item: -item[1])[:12]:
        emit(f"warm_create_span {name}", value, "ms", create_ms, f"{create} then first exec, client total", "")
    # The first command in a claimed VM, hop by hop, against the same command's p50 later in the same sandbox.
    emit("warm_create_first_exec", first_exec_ms, "ms", client_p50, "exec_true_client_p50 (same sandbox, later)", "")
    first_exec = [
        collector.spans[t] for t in create_traces if any(s.name == "guest.exec.spawn" for _, s in collector.spans[t])
    ]
    first_hops = (exec_hops(first_exec[0], first_exec_ms) if first_exec else None) or {}
    for hop, value in first_hops.items():
        later = statistics.median(hops[hop]) if hops.get(hop) else 0.0
        emit(f"warm_create_first_exec_hop_{hop}", value, "ms", later, f"exec_hop_{hop} p50", "")
    fork_spans(gateway, sandbox.name, collector)


def tail_hops(timed: list, totals: list[float]) -> None:
    """What the slowest calls (the top 2 %, at least 3) spent more than a median one, hop by hop: rows
    `exec_tail_hop_<hop>` whose value is the hop's mean in those calls and whose baseline is its p50 in all."""
    per_call = [exec_hops(spans, client_ms) or {} for spans, client_ms in zip(timed, totals, strict=False)]
    ranked = sorted(range(len(per_call)), key=lambda i: -totals[i])[: max(3, len(per_call) // 50)]
    slowest = statistics.mean(totals[i] for i in ranked)
    emit("exec_tail_total", slowest, "ms", statistics.median(totals), "exec_true_client_p50", "p99 <= 2x p50")
    for hop in per_call[0] if per_call else ():
        typical = statistics.median(call[hop] for call in per_call if hop in call)
        tail = statistics.mean(per_call[i].get(hop, 0.0) for i in ranked)
        emit(f"exec_tail_hop_{hop}", tail, "ms", typical, f"exec_hop_{hop} p50", "")


def sdk_vs_raw(gateway: Gateway, address: str, name: str) -> None:
    """exec `true` through the synchronous Python SDK (microvm_sandbox.Sandbox.exec) against the same call as raw
    gRPC, alternating in the same sandbox. The SDK's cost is its own work: one connection, one hop to its loop."""
    from microvm_sandbox import Sandbox

    sandbox = Sandbox.connect(name.rsplit("/", 1)[-1], address=address, api_key=gateway.api_key)
    raw, sdk = [], []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        gateway.exec(name, ["true"])
        t1 = time.perf_counter()
        sandbox.exec(["true"])
        sdk.append((time.perf_counter() - t1) * 1000)
        raw.append((t1 - t0) * 1000)
    emit("exec_true_sync_sdk_p50", statistics.median(sdk), "ms", statistics.median(raw), "raw gRPC p50", "+1 ms")


def fork_spans(gateway: Gateway, source: str, collector: Collector) -> None:
    """ForkSandbox(count=FORK_COUNT): the server spans of its trace by service and name, with how many there were
    and their longest (the clones restore in parallel: the longest, not the sum, is on the path)."""
    with collector.lock:
        collector.spans.clear()
    started = time.perf_counter()
    forked = gateway.stub.ForkSandbox(api.ForkSandboxRequest(name=source, count=FORK_COUNT), timeout=900)
    fork_ms = (time.perf_counter() - started) * 1000
    time.sleep(FLUSH_SECONDS)
    with collector.lock:
        spans = next(
            (found for found in collector.spans.values() if any(s.name.endswith("/ForkSandbox") for _, s in found)),
            [],
        )
    longest: dict[str, list[float]] = collections.defaultdict(list)
    steps: dict[str, list[float]] = collections.defaultdict(list)
    for who, span in spans:
        if span.kind == 2:  # server spans: each service's own handling
            longest[f"{who.removeprefix('microvm-')} {span.name.rsplit('/', 1)[-1]}"].append(ms(span))
        elif span.name.startswith("compute."):  # compute's steps inside SnapshotVm and each RestoreVm
            steps[span.name].append(ms(span))
    for name, values in sorted(longest.items(), key=lambda item: -max(item[1]))[:10]:
        emit(f"fork_{FORK_COUNT}_span {name} x{len(values)}", max(values), "ms", fork_ms, "ForkSandbox total", "")
    for name, values in sorted(steps.items(), key=lambda item: -max(item[1])):
        # The longest and the median: a step every clone waits out shows in both; one clone's in the longest only.
        median = statistics.median(values)
        emit(f"fork_{FORK_COUNT}_step {name} x{len(values)}", max(values), "ms", median, "median", "")
    for clone in forked.sandboxes:
        gateway.delete(clone.name)


if __name__ == "__main__":
    sys.exit(main())
