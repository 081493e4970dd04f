"""Traces (services/common/observability.py and the gRPC interceptors of services/common/server.py): one trace from
the caller's call through gateway, auth, compute and relay, seen with an in-process exporter on a whole
installation (fake VMM); and the OTLP exporter delivering spans to a collector (a real OTLP/gRPC server here)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid

import grpc
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common import observability
from tests.inprocess import tenant_caller


@pytest.fixture
def spans():
    """Spans of this process's services, kept in memory (the services of an in-process installation share it); the
    exporter stops keeping them after the test (a process's tracer provider is set once and stays)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def test_one_trace_goes_from_the_gateway_through_auth_compute_and_relay(installation, spans):
    caller = await tenant_caller(installation, f"traced-{uuid.uuid4().hex[:6]}")
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    run = api.ExecRequest(
        sandbox=created.sandbox.name, process=api.ProcessConfig(argv=["sh", "-c", "echo $TRACEPARENT"])
    )
    events = [event async for event in caller.stub.Exec(run, metadata=caller.metadata, timeout=60)]
    seen_in_guest = b"".join(event.stdout for event in events).decode().strip()
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata)

    finished = spans.get_finished_spans()
    by_name = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    [create] = by_name["/microvm.sandbox.v1.SandboxService/CreateSandbox"][-1:]
    in_create = {span.name for span in finished if span.context.trace_id == create.context.trace_id}
    assert any(name.startswith("/microvm.auth.v1.AuthService/") for name in in_create), in_create
    assert any(name.startswith("/microvm.compute.v1.ComputeService/") for name in in_create), in_create
    assert any(name.startswith("/microvm.relay.v1.") for name in in_create), in_create
    # Server spans of the inner services are children within the same trace, not new roots.
    inner = [s for s in finished if s.context.trace_id == create.context.trace_id and s is not create]
    assert all(span.parent is not None for span in inner)

    # The relay serves the same public Exec the gateway hands on: two server spans of one trace, the relay's a
    # grandchild of the gateway's (through the gateway's client span).
    exec_name = "/microvm.sandbox.v1.SandboxService/Exec"
    root = next(s for s in by_name[exec_name] if s.parent is None and s.kind == SpanKind.SERVER)
    servers = [
        s for s in by_name[exec_name] if s.kind == SpanKind.SERVER and s.context.trace_id == root.context.trace_id
    ]
    assert len(servers) == 2, servers
    relay_side = next(s for s in servers if s is not root)
    client = next(s for s in finished if s.context.span_id == relay_side.parent.span_id)
    assert client.kind == SpanKind.CLIENT and client.parent.span_id == root.context.span_id
    # And into the guest: the agent's part (taking the frame to the process spawned), under the relay's span, from
    # the times the agent reports with the trace context it was sent.
    [spawn] = [s for s in by_name["guest.exec.spawn"] if s.context.trace_id == root.context.trace_id]
    assert spawn.parent.span_id == relay_side.context.span_id and spawn.attributes["pid"] > 0
    assert relay_side.start_time <= spawn.start_time <= spawn.end_time <= relay_side.end_time
    # The rest of the guest's path, one span per hop, in order: ExecStart's way in, the spawn, the process's run,
    # the agent's finish, ExecExited's way out (the sync between guest and host clocks allows a little slack).
    in_exec = [s for s in finished if s.context.trace_id == root.context.trace_id]
    path = [
        next(s for s in in_exec if s.name == name and s.attributes.get("frame") != "exec_started")
        for name in ("agent_channel.to_guest", "guest.exec.spawn", "guest.exec.run", "guest.exec.finish")
    ]
    path.append(
        next(s for s in in_exec if s.name == "agent_channel.to_host" and s.attributes["frame"] == "exec_exited")
    )
    assert all(span.parent.span_id == relay_side.context.span_id for span in path)
    slack = 50_000_000
    for before, after in zip(path, path[1:], strict=False):
        assert after.start_time >= before.end_time - slack, (before.name, after.name)
    # The process itself gets the context (OpenTelemetry's TRACEPARENT environment carrier), with the same trace.
    assert seen_in_guest.split("-")[1] == format(root.context.trace_id, "032x"), seen_in_guest


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.arrived = asyncio.Event()

    async def Export(self, request, context):
        self.requests.append(request)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_otlp_exporter_delivers_spans_to_a_collector():
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        # A process of its own: a process has one tracer provider, set once (this one has the in-memory one).
        script = textwrap.dedent(
            f"""
            from opentelemetry import trace
            from services.common import observability
            observability.configure("probe", "probe-1", "info", "otlp", "127.0.0.1:{port}")
            with trace.get_tracer("probe").start_as_current_span("probe-span"):
                pass
            trace.get_tracer_provider().shutdown()  # flushes the batch
            """
        )
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        await asyncio.wait_for(collector.arrived.wait(), 30)
    finally:
        await server.stop(0)
    [request] = collector.requests
    [resource_spans] = request.resource_spans
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == "microvm-probe" and attributes["service.instance.id"] == "probe-1"
    assert [span.name for scope in resource_spans.scope_spans for span in scope.spans] == ["probe-span"]


async def test_log_lines_of_a_call_carry_its_tenant_and_sandbox(installation):
    tenant = f"logged-{uuid.uuid4().hex[:6]}"
    caller = await tenant_caller(installation, tenant)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    missing_file = api.StatRequest(sandbox=created.sandbox.name, path="/no/such/file")
    missing_sandbox = api.GetSandboxRequest(name="sandboxes/never-was")
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
        with pytest.raises(grpc.aio.AioRpcError):
            await caller.stub.Stat(missing_file, metadata=caller.metadata)
        with pytest.raises(grpc.aio.AioRpcError):
            await caller.stub.GetSandbox(missing_sandbox, metadata=caller.metadata)
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata)
    failed = {line["method"].rpartition("/")[2]: line for line in lines if line["event"] == "call_failed"}
    # The relay's line of the failed Stat names the sandbox (by its cluster id)...
    assert failed["Stat"]["sandbox"].startswith("sbx-"), failed
    # ...and the gateway's line of the failed GetSandbox the caller's tenant.
    assert failed["GetSandbox"]["tenant"] == tenant and "sandbox" not in failed["GetSandbox"], failed
    # Outside a call nothing is bound: background work never carries a stale sandbox.
    observability.bind_to_call(sandbox="stale")
    assert "sandbox" not in structlog.contextvars.get_contextvars()
