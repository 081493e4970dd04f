"""Prometheus metrics of one service process: its own registry, the gRPC RED metrics of every call it serves, and
a `/metrics` HTTP endpoint on a port of its own, whose address goes into the service's etcd registration (metadata
`metrics`) so that Prometheus finds every instance from the registry (services/supervisor/prometheus.py).

A registry per service, not prometheus_client's global one: tests run several services in one process, and each
must count only its own calls. Label sets are bounded: a gRPC method, a status code, a state, a template; never a
sandbox id or a tenant-chosen string.

The gRPC names follow go-grpc-prometheus, which Grafana dashboards and alert rules already speak:
`grpc_server_started_total`, `grpc_server_handled_total` (with `grpc_code`) and `grpc_server_handling_seconds`,
labelled `grpc_service`, `grpc_method`, `grpc_type`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from services.common import observability

log = structlog.get_logger()

# The longest a scrape waits for the readings that need an await (etcd, a subprocess); Prometheus's own timeout is 10 s.
REFRESH_SECONDS = 5.0
# Seconds: from sub-millisecond calls (health, a file stat) to long creates and builds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STREAM_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class ServiceMetrics:
    """The registry of one service instance and its gRPC metrics."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter("grpc_server_started", "gRPC calls started", labels, registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled",
            "gRPC calls completed, by status code",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from a gRPC call's start to its end (a stream: its whole life)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refreshers: list[Callable[[], Awaitable[None]]] = []

    def gauge_callback(self, name: str, documentation: str, labels: Iterable[str], sample: Callable) -> None:
        """A gauge read when Prometheus scrapes: `sample()` gives {label values tuple: value}. For values the
        service already keeps (VMs by state, pool depth): nothing to keep in step."""
        self.registry.register(CallbackGauge(name, documentation, tuple(labels), sample))

    def before_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """`refresh()` runs before each scrape, for readings that need an await (etcd records, a subprocess): it
        keeps what it read and the callback gauges report that. Bounded by REFRESH_SECONDS; one that fails or is too
        slow is logged and its gauges show what it kept last."""
        self.refreshers.append(refresh)

    async def refresh(self) -> None:
        async def bounded(refresh) -> None:
            try:
                await asyncio.wait_for(refresh(), REFRESH_SECONDS)
            except Exception:
                log.exception("metric_refresh_failed", refresh=getattr(refresh, "__qualname__", str(refresh)))

        await asyncio.gather(*(bounded(refresh) for refresh in self.refreshers))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class CallbackGauge(Collector):
    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], sample: Callable) -> None:
        self.name, self.documentation, self.labels, self.sample = name, documentation, labels, sample

    def describe(self):
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self):
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        try:
            values = self.sample()
        except Exception:  # a scrape must never fail because one reading did: that one is left out
            log.exception("metric_sample_failed", metric=self.name)
            values = {}
        for label_values, value in values.items():
            family.add_metric([str(part) for part in label_values], float(value))
        yield family


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call. Placed outside the error mapping, so it sees the status the caller gets."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        kind = STREAM_TYPES[(handler.request_streaming, handler.response_streaming)]
        labels = (service, method, kind)
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            async def streaming(request, context):
                started = self._start(labels)
                code = grpc.StatusCode.OK
                try:
                    async for response in _responses(inner, request, context):
                        yield response
                except BaseException as error:
                    code = _failure_code(error, context)
                    raise
                finally:
                    self._end(labels, started, code, context)

            behaviour = streaming
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request, context):
                started = self._start(labels)
                code = grpc.StatusCode.OK
                try:
                    return await inner(request, context)
                except BaseException as error:
                    code = _failure_code(error, context)
                    raise
                finally:
                    self._end(labels, started, code, context)

            behaviour = unary
        return _replace_behaviour(handler, behaviour)

    def _start(self, labels: tuple[str, str, str]) -> float:
        observability.IN_CALL.set(True)  # each call is a task of its own: this stays inside it
        self.metrics.started.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels, started: float, code: grpc.StatusCode, context) -> None:
        if code == grpc.StatusCode.OK:
            code = _context_code(context) or grpc.StatusCode.OK  # a servicer that set a code and returned
        self.metrics.handled.labels(*labels, code.name).inc()
        self.metrics.handling.labels(*labels).observe(time.perf_counter() - started)


async def _responses(inner, request, context):
    result = inner(request, context)
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:  # a servicer that writes with context.write and returns
        await result


def _context_code(context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:
        return None
    if isinstance(code, int):
        return next((status for status in grpc.StatusCode if status.value[0] == code), None)
    return code


def _failure_code(error: BaseException, context) -> grpc.StatusCode:
    import asyncio

    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = _context_code(context)
    if code is not None and code != grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception that set no status


def _replace_behaviour(handler, behaviour):
    if handler.request_streaming and handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class MetricsEndpoint:
    """`GET /metrics` (Prometheus text format) on its own HTTP listener."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def start(self, host: str, port: int) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # port 0: the one the kernel chose
        self.address = f"{host}:{bound[1]}"
        return self.address

    async def _serve(self, request: web.Request) -> web.Response:
        await self.metrics.refresh()
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
