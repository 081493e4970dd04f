"""The gateway's Prometheus metrics: exec streams open, bytes streamed between clients and sandboxes, and sandbox
creates by result with their latency by the path the VM started by.

Streams are counted by an interceptor on the public port, from the messages themselves: the HTTP/JSON gateway calls
that same port, so every client is counted once, and the data plane's code stays as it is. Creates are measured
around `Sandboxes.start`, the one step that creates, restores and forks share (placement, the VM's start, the record
made RUNNING); the VM's record says how it started (compute's `start_method`). The gateway keeps no sandbox records of
its own, so sandboxes by state are compute's (`microvm_vms`) and not repeated here.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import ServiceError
from services.common.metrics import ServiceMetrics

SANDBOX = "/microvm.sandbox.v1.SandboxService/"
PORTS = "/microvm.sandbox.v1.PortForwardService/"
EXEC_STREAMS = {SANDBOX + method: method for method in ("Exec", "ExecInteractive", "ConnectProcess")}
# Seconds from placement to RUNNING: a warm-pool claim takes milliseconds, a cold boot under TCG tens of seconds.
CREATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)


def _exec_output(event) -> tuple[str, int] | None:
    kind = event.WhichOneof("event")
    return (kind, len(getattr(event, kind))) if kind in ("stdout", "stderr") else None


def _field(kind: str, name: str):
    def read(message) -> tuple[str, int] | None:
        return (kind, len(getattr(message, name))) if message.WhichOneof("request") == name else None

    return read


def _data(kind: str):
    return lambda message: (kind, len(message.data)) if message.data else None


# Method -> (what its requests carry to the sandbox, what its responses carry to the client): (kind, bytes) or None.
CARRIED = {
    SANDBOX + "Exec": (None, _exec_output),
    SANDBOX + "ExecInteractive": (_field("stdin", "stdin"), lambda m: _exec_output(m.event)),
    SANDBOX + "ConnectProcess": (None, lambda m: _exec_output(m.event)),
    SANDBOX + "SendProcessInput": (lambda m: ("stdin", len(m.stdin)) if m.stdin else None, None),
    SANDBOX + "ReadFile": (None, _data("file")),
    SANDBOX + "WriteFile": (_field("file", "data"), None),
    SANDBOX + "DownloadArchive": (None, _data("archive")),
    SANDBOX + "UploadArchive": (_field("archive", "data"), None),
    PORTS + "ForwardPort": (_field("port_forward", "data"), _data("port_forward")),
}


class StreamMetrics(grpc.aio.ServerInterceptor):
    """`microvm_exec_streams_open{method}` and `microvm_stream_bytes_total{direction, kind}` on the public port."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.open = Gauge(
            "microvm_exec_streams_open",
            "Exec, ExecInteractive and ConnectProcess streams open on this gateway",
            ["method"],
            registry=metrics.registry,
        )
        self.bytes = Counter(
            "microvm_stream_bytes",
            "Bytes streamed between clients and sandboxes: direction to_sandbox or to_client, and what they were",
            ["direction", "kind"],
            registry=metrics.registry,
        )
        for method in EXEC_STREAMS.values():
            self.open.labels(method)  # present at 0 before the first stream

    def count(self, direction: str, read, message) -> None:
        carried = read(message)
        if carried is not None and carried[1]:
            self.bytes.labels(direction, carried[0]).inc(carried[1])

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        carried = CARRIED.get(handler_call_details.method)
        if handler is None or carried is None:
            return handler
        upstream, downstream = carried
        exec_method = EXEC_STREAMS.get(handler_call_details.method)
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def sent(requests):
            async for request in requests:
                self.count("to_sandbox", upstream, request)
                yield request

        def arguments(request_or_iterator):
            if upstream is None:
                return request_or_iterator
            if handler.request_streaming:
                return sent(request_or_iterator)
            self.count("to_sandbox", upstream, request_or_iterator)
            return request_or_iterator

        if not handler.response_streaming:

            async def unary(request_or_iterator, context):
                return await inner(arguments(request_or_iterator), context)

            return _with_behaviour(handler, unary)

        async def streaming(request_or_iterator, context):
            if exec_method:
                self.open.labels(exec_method).inc()
            try:
                async for response in _responses(inner(arguments(request_or_iterator), context)):
                    if downstream is not None:
                        self.count("to_client", downstream, response)
                    yield response
            finally:
                if exec_method:
                    self.open.labels(exec_method).dec()

        return _with_behaviour(handler, streaming)


class CreateMetrics:
    """`microvm_sandbox_creates_total{result, method}` and `microvm_sandbox_create_seconds{method}`."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.creates = Counter(
            "microvm_sandbox_creates",
            "Sandboxes created, restored or forked, by result (ok or the status code) and the VM's start method",
            ["result", "method"],
            registry=metrics.registry,
        )
        self.seconds = Histogram(
            "microvm_sandbox_create_seconds",
            "Time from placement to a RUNNING sandbox, by the VM's start method",
            ["method"],
            buckets=CREATE_BUCKETS,
            registry=metrics.registry,
        )

    def watch(self, sandboxes) -> None:
        """Measures every `sandboxes.start` from now on (creates, restores and forks all go through it)."""
        start = sandboxes.start

        async def measured(record, start_vm, only_node: str = ""):
            began, method = time.perf_counter(), "none"  # none: it failed before a VM started

            async def started_vm(node: str):
                nonlocal method
                vm = await start_vm(node)
                method = vm.start_method or "unknown"
                return vm

            try:
                running = await start(record, started_vm, only_node)
            except BaseException as error:
                self.creates.labels(result_of(error), method).inc()
                raise
            self.creates.labels("ok", method).inc()
            self.seconds.labels(method).observe(time.perf_counter() - began)
            return running

        sandboxes.start = measured


def result_of(error: BaseException) -> str:
    """The status code the create ends with, as a label (`resource_exhausted`, `unavailable`, ...)."""
    if isinstance(error, ServiceError):
        return error.code.name.lower()
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name.lower()
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "internal"


async def _responses(result):
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:  # a servicer that writes with context.write and returns
        await result


def _with_behaviour(handler, behaviour):
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
