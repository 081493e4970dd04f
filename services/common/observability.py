"""structlog JSON logs that carry the current OpenTelemetry trace and span ids."""

from __future__ import annotations

import contextvars
import logging
import sys

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

# True inside a gRPC call this process serves (set per call by services/common/metrics.MetricsInterceptor; each call
# is a task of its own, so it never leaks into background work).
IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("microvm_in_call", default=False)


def bind_to_call(**values: str) -> None:
    """Adds `values` (a tenant, a sandbox id) to every later log line of the current call; nothing outside a call,
    where a background task going through many sandboxes would otherwise tag its lines with a stale one."""
    if IN_CALL.get():
        structlog.contextvars.bind_contextvars(**values)


def _add_trace_context(_logger, _method, event_dict):
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict["trace_id"] = format(span_context.trace_id, "032x")
        event_dict["span_id"] = format(span_context.span_id, "016x")
    return event_dict


def configure(
    service: str,
    instance_id: str,
    level: str = "info",
    trace_exporter: str = "none",
    otlp_endpoint: str = "",
    node: str = "",
) -> None:
    """Sets up JSON logs on stderr and a tracer provider for this process. Each line carries the service, instance,
    node (node services), trace and span ids, and, where a call has them, the caller's tenant and the sandbox.
    `trace_exporter` "off": no tracer provider is installed, so every span is a no-op (tracing's cost is gone)."""
    numeric_level = getattr(logging, level.upper())
    logging.basicConfig(stream=sys.stderr, level=numeric_level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_context,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service, instance=instance_id, **({"node": node} if node else {}))
    if trace_exporter == "off":
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"microvm-{service}", "service.instance.id": instance_id})
    )
    if trace_exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Batched, in the background: a slow or absent collector never slows a call.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
