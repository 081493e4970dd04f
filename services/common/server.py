"""The one bootstrap every service calls: `run_service(...)` from its `__main__`.

It gives a service a grpc.aio server with the standard health service, server reflection, the
OpenTelemetry interceptor and the error mapping; JSON logs; an etcd client, a lease-backed
registration and a live directory of the other services; graceful shutdown on SIGTERM/SIGINT (stop
accepting, drain in-flight calls up to a bound, deregister); and config validated at start with a
clear message and a non-zero exit when it is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor

from services.common import observability
from services.common.config import CommonSettings, ConfigError, load_config, parse_address
from services.common.dependencies import (
    PERIOD_SECONDS,
    Dependency,
    DependencyHealth,
    disk_dependency,
    etcd_dependency,
)
from services.common.errors import ErrorMappingInterceptor
from services.common.etcd_metrics import time_etcd_requests
from services.common.metrics import MetricsEndpoint, MetricsInterceptor, ServiceMetrics
from services.common.pki import TLS_CHANNEL_OPTIONS, Identity, load_identity
from services.common.registry import ServiceDirectory, ServiceInstance, ServiceRegistration, etcd_client, etcd_identity
from services.common.tasks import cancel_and_wait

S = TypeVar("S")
T = TypeVar("T")
log = structlog.get_logger()

# Messages up to 8 MiB: file chunks are 1 MiB, a stdin payload up to 4 MiB.
MAX_MESSAGE_BYTES = 8 << 20
SHUTDOWN_STEP_SECONDS = 3.0
PUBLIC_KINDS = {"gateway"}
# One instance of each per node: they own the node's VMs, devices, channels and chunks.
NODE_KINDS = {"compute", "network", "relay", "snapshot"}
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def advertised_address(settings, port: int) -> str:
    """The address others call: `advertise_address` if set (its port defaults to the bound one), else the
    listen host with the bound port; an unspecified listen host (0.0.0.0, ::) is replaced by this host's
    address."""
    if settings.advertise_address:
        host, _, advertised_port = settings.advertise_address.rpartition(":")
        if not host:
            host, advertised_port = settings.advertise_address, ""
        return f"{host}:{advertised_port or port}"
    host = settings.listen.rpartition(":")[0]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


def never_reached(error: BaseException) -> bool:
    """The call cannot have been seen by any server: none is registered, or it failed to connect. Retrying
    it cannot do anything twice."""
    from services.common.errors import Unavailable

    if isinstance(error, Unavailable):
        return True
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.UNAVAILABLE
        and "failed to connect" in (error.details() or "")
    )


# Client streams forwarded to another service are not traced: the tracing interceptor awaits a call's end before
# handing the call over, which would hide the callee's early initial metadata (`mvm-refused`, a refusal the caller
# must see at once to stop sending: services/common/client_streams.py).
UNTRACED_METHODS = ("/WriteFile", "/UploadArchive", "/PutArtifact")


def traced(details) -> bool:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return not method.endswith(UNTRACED_METHODS)


@dataclass
class ServiceContext(Generic[S]):
    """What a service's wiring gets: its config, etcd, and a way to reach other services."""

    kind: str
    instance_id: str
    common: CommonSettings
    settings: S
    etcd: Any
    directory: ServiceDirectory
    registration: ServiceRegistration | None = None
    # Published with the registration, e.g. a compute node's VMM and accelerator.
    registration_metadata: dict[str, Any] = field(default_factory=dict)
    # Coroutines run at shutdown, after the server stopped accepting and drained (reverse order).
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    identity: Identity | None = None
    # What the service depends on beyond etcd and its disk (services/common/dependencies.py): wirings append.
    dependencies: list[Dependency] = field(default_factory=list)
    # The service's Prometheus registry (its gRPC metrics; wirings add their own, see services/common/metrics.py).
    metrics: ServiceMetrics = field(default_factory=lambda: ServiceMetrics(""))
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def channel(self, address: str) -> grpc.aio.Channel:
        """A cached client channel to another service at `address`: mutual TLS with this service's
        certificate when the installation uses it, and tracing interceptors."""
        channel = self._channels.get(address)
        if channel is None:
            if self.identity is not None:
                channel = grpc.aio.secure_channel(
                    address,
                    self.identity.channel_credentials(),
                    options=CHANNEL_OPTIONS + TLS_CHANNEL_OPTIONS,
                    interceptors=aio_client_interceptors(filter_=traced),
                )
            else:
                channel = grpc.aio.insecure_channel(
                    address, options=CHANNEL_OPTIONS, interceptors=aio_client_interceptors(filter_=traced)
                )
            self._channels[address] = channel
        return channel

    async def call_newest(
        self,
        kind: str,
        node: str | None,
        stub_class,
        method: str,
        request,
        *,
        timeout: float | None,
        retry_for: float,
        retryable: Callable[[BaseException], bool] = never_reached,
    ):
        """`method(request)` on the newest instance of `kind` (on `node`); see `on_newest`."""
        return await self.on_newest(
            kind,
            node,
            stub_class,
            lambda stub: getattr(stub, method)(request, timeout=timeout),
            retry_for=retry_for,
            retryable=retryable,
        )

    async def on_newest(
        self,
        kind: str,
        node: str | None,
        stub_class,
        invoke: Callable[[Any], Awaitable[T]],
        *,
        retry_for: float,
        retryable: Callable[[BaseException], bool] = never_reached,
    ) -> T:
        """`invoke(stub)` on the newest instance of `kind` (on `node`); when it fails as a dead instance does
        (`retryable`: it never reached a server), on the newest of the others (a replica), and again for up to
        `retry_for` seconds: a killed instance stays registered until its lease ends, its successor registers when
        it is ready."""
        from services.common.errors import Unavailable

        deadline = asyncio.get_running_loop().time() + retry_for
        failed: set[str] = set()
        while True:
            instance = self.directory.newest(kind, node, avoid=failed)
            try:
                return await invoke(stub_class(self.channel(instance.address)))
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                if not retryable(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                if instance.key in failed:  # every instance failed once: wait for a successor
                    await asyncio.sleep(0.2)
                failed.add(instance.key)

    def every(self, seconds: float, work: Callable[[], Awaitable[None]], name: str) -> None:
        """Runs `work` every `seconds` in the background until shutdown; a failure is logged, not fatal."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await work()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("periodic_work_failed", work=name)

        task = asyncio.create_task(loop(), name=name)
        self.on_shutdown.append(lambda: cancel_and_wait(task))

    async def close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


# A service's wiring: registers its servicers on the server and returns their full service names
# (for health and reflection). It may append shutdown hooks to the context.
Wiring = Callable[[grpc.aio.Server, ServiceContext], Awaitable[list[str]]]


async def serve(
    kind: str,
    common: CommonSettings,
    settings: Any,
    wiring: Wiring,
    instance_id: str | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    interceptors=None,
) -> None:
    """Runs a service until `stop` is set or SIGTERM/SIGINT arrives."""
    instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (RuntimeError, ValueError):  # not the main thread (tests): the caller sets `stop`
            pass

    identity = load_identity(common.pki_path, kind) if common.internal_tls else None
    etcd = etcd_client(common.etcd_endpoints, identity=etcd_identity(common, kind))
    await etcd.connect()
    directory = ServiceDirectory(etcd)
    await directory.open()
    context = ServiceContext(
        kind=kind,
        instance_id=instance_id,
        common=common,
        settings=settings,
        etcd=etcd,
        directory=directory,
        identity=identity,
        metrics=ServiceMetrics(kind),
    )
    time_etcd_requests(etcd, context.metrics)
    metrics_endpoint = MetricsEndpoint(context.metrics)
    registration = ServiceRegistration(
        etcd,
        ServiceInstance(
            kind=kind,
            instance_id=instance_id,
            address="",
            node=common.node if kind in NODE_KINDS else "",
            metadata=context.registration_metadata,
        ),
        ttl=common.lease_ttl_seconds,
        on_lost=lambda reason: stop.set(),
    )
    server: grpc.aio.Server | None = None
    try:
        if kind in NODE_KINDS:
            # Before the wiring runs: a second compute on a node would otherwise adopt (and kill) its VMs.
            await registration.claim_node()

        # Outermost first: tracing, metrics (which see the status a caller gets), then the error mapping, then the
        # service's own (which may raise ServiceError).
        server = grpc.aio.server(
            interceptors=[
                aio_server_interceptor(),
                MetricsInterceptor(context.metrics),
                ErrorMappingInterceptor(),
                *(interceptors(context) if interceptors else []),
            ],
            options=CHANNEL_OPTIONS,
        )
        service_names = await wiring(server, context)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [
                *service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        # Internal services accept only this installation's services; the public gateway port authenticates
        # callers with bearer credentials instead (it is the one door clients use).
        if identity is not None and kind not in PUBLIC_KINDS:
            port = server.add_secure_port(settings.listen, identity.server_credentials())
        else:
            port = server.add_insecure_port(settings.listen)
        if port == 0:
            raise ConfigError(f"{kind}.listen: cannot bind {settings.listen}")
        await server.start()
        for name in ("", *service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        registration.instance.address = advertised_address(settings, port)
        if common.metrics_listen:
            host, metrics_port = parse_address(common.metrics_listen, key="metrics_listen")
            registration.instance.metadata["metrics"] = await metrics_endpoint.start(host, metrics_port)
        await registration.open()
        context.registration = registration
        checks = [etcd_dependency(etcd), disk_dependency(common.state_dir), *context.dependencies]
        dependency_health = DependencyHealth(checks, health_servicer, registration)
        await dependency_health.refresh()
        context.every(PERIOD_SECONDS, dependency_health.refresh, "dependency-health")
        log.info(
            "service_started",
            address=registration.instance.address,
            node=registration.instance.node,
            services=service_names,
        )
        if ready is not None:
            ready.set()

        await stop.wait()
        log.info("service_stopping", grace_seconds=settings.shutdown_grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        # Deregister first so no new caller is sent here, then drain in-flight calls.
        await registration.close()
        await server.stop(settings.shutdown_grace_seconds)
    finally:
        # Also when the wiring or the start failed (a bad setting found late): the node lock and every task
        # are released, each step bounded, so the process exits with its message instead of hanging in
        # asyncio.run's cancellation of tasks still talking to etcd.
        await _bounded(registration.close())
        if server is not None:
            await _bounded(server.stop(0))
        for hook in reversed(context.on_shutdown):
            try:
                await asyncio.wait_for(hook(), SHUTDOWN_STEP_SECONDS)
            except Exception:
                log.exception("shutdown_hook_failed")
        for step in (metrics_endpoint.stop(), context.close_channels(), directory.close(), etcd.close()):
            await _bounded(step)
    log.info("service_stopped")


async def _bounded(step: Awaitable[Any]) -> None:
    """One shutdown step, given up after SHUTDOWN_STEP_SECONDS: with etcd gone nothing may hang the exit."""
    try:
        await asyncio.wait_for(step, SHUTDOWN_STEP_SECONDS)
    except Exception:
        pass


def run_service(
    kind: str, settings_cls: type, wiring: Wiring, argv: list[str] | None = None, interceptors=None
) -> None:
    """Entry point of a service process: parse args, load config, run until signalled."""
    parser = argparse.ArgumentParser(prog=f"microvm-{kind}")
    parser.add_argument("--config", help="installation config file (YAML); default: built-in defaults")
    parser.add_argument("--instance-id", help="registration id; default: host-pid-random")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, kind, settings_cls)
    except ConfigError as exc:
        print(f"microvm-{kind}: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    instance_id = args.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    observability.configure(
        kind,
        instance_id,
        config.common.log_level,
        config.common.trace_exporter,
        config.common.otlp_endpoint,
        node=config.common.node if kind in NODE_KINDS else "",
    )
    try:
        asyncio.run(
            serve(kind, config.common, config.service, wiring, instance_id=instance_id, interceptors=interceptors)
        )
    except ConfigError as exc:
        print(f"microvm-{kind}: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
