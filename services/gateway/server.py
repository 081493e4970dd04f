"""Wiring of the gateway: the public SandboxService, the admin NodeService, HTTP/JSON, the E2B doors, and the expiry
reaper."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from aiohttp import web

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.sandbox.v1 import (
    code_service_pb2,
    code_service_pb2_grpc,
    desktop_service_pb2,
    desktop_service_pb2_grpc,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
    port_forward_service_pb2,
    port_forward_service_pb2_grpc,
    sandbox_service_pb2,
    sandbox_service_pb2_grpc,
    template_service_pb2,
    template_service_pb2_grpc,
)
from services.common.config import ConfigError, parse_address
from services.common.records import SANDBOXES, Records
from services.common.server import ServiceContext
from services.common.settings import GatewaySettings
from services.gateway.access import AccessInterceptor
from services.gateway.code import CodeOps, CodeServicer
from services.gateway.console import ConsoleLogs
from services.gateway.data_plane import DataPlane
from services.gateway.desktop import DesktopServicer
from services.gateway.desktop_live import DesktopLive
from services.gateway.e2b import listeners as e2b_listeners
from services.gateway.exposed_ports import ExposedPorts
from services.gateway.http import HttpGateway
from services.gateway.local_credentials import LocalApiKeys
from services.gateway.metrics import CreateMetrics, StreamMetrics
from services.gateway.node_admin import NodeAdmin
from services.gateway.nodes import ClusterNodes
from services.gateway.notifications import wire_notifications
from services.gateway.placement import SandboxPlacement
from services.gateway.port_forward import PortForwardServicer
from services.gateway.quotas import QuotaClient
from services.gateway.records import SandboxStore
from services.gateway.sandbox_metrics import SandboxMetricsServicer
from services.gateway.sandbox_upkeep import SandboxUpkeep
from services.gateway.sandboxes import Sandboxes
from services.gateway.servicer import NodeServicer, SandboxServicer
from services.gateway.snapshots import SnapshotOps
from services.gateway.template_builds import TemplateBuilds
from services.gateway.template_images import TemplateImages
from services.gateway.template_recipes import BuiltInRecipes
from services.gateway.template_service import TemplateOps, TemplateServicer
from services.gateway.template_store import TemplateStore
from services.gateway.templates import TemplateCatalog


def interceptors(context: ServiceContext[GatewaySettings]) -> list:
    settings = context.settings
    streams = StreamMetrics(context.metrics)  # exec streams open, bytes streamed (services/gateway/metrics.py)
    if not settings.require_auth:
        return [streams]
    keys = LocalApiKeys(context.etcd)  # a valid API key is checked here, without a round trip to auth
    keys.start()
    context.on_shutdown.append(keys.close)
    access = AccessInterceptor(
        context, settings.rate_limit_per_second, settings.rate_limit_burst, settings.operator_tenants, keys
    )
    # Audit entries of callers that hung up are still being written: finished before the channels close.
    context.on_shutdown.append(access.drain)
    return [access, streams]


class Gateway:
    """The gateway's parts, put together once (tests and tools use them directly too)."""

    def __init__(self, context: ServiceContext[GatewaySettings]) -> None:
        self.store = SandboxStore(context.etcd)
        self.nodes = ClusterNodes(context)
        self.placement = SandboxPlacement(self.nodes)
        self.templates = TemplateStore(context.etcd, TemplateCatalog(context.etcd))
        self.sandboxes = Sandboxes(
            context, self.store, self.nodes, self.placement, QuotaClient(context), self.templates
        )
        self.template_images = TemplateImages(self.templates, self.nodes, self.sandboxes.quotas)
        self.builds = TemplateBuilds(context, self.templates, self.nodes, self.template_images)
        work_root = Path(context.common.state_dir) / "gateway" / "build-contexts"
        self.template_ops = TemplateOps(self.templates, self.builds, self.nodes, work_root)
        self.templates.on_missing = BuiltInRecipes(self.templates, self.builds, work_root).on_missing
        self.snapshots = SnapshotOps(self.sandboxes)
        self.data = DataPlane(self.sandboxes, self.nodes)
        self.ports = ExposedPorts(self.sandboxes)
        self.console = ConsoleLogs(self.sandboxes, self.nodes)
        self.admin = NodeAdmin(self.store, self.nodes, self.placement, self.snapshots)


def bind_http_socket(listen: str) -> socket.socket:
    host, port = parse_address(listen, key="gateway.http_listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as error:
        raise ConfigError(f"gateway.http_listen: cannot bind {listen}: {error.strerror}") from None
    sock.setblocking(False)
    return sock


async def wire(server, context: ServiceContext[GatewaySettings]) -> list[str]:
    await Records(context.etcd).migrate(SANDBOXES)
    gateway = Gateway(context)
    CreateMetrics(context.metrics).watch(gateway.sandboxes)
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(
        SandboxServicer(
            gateway.sandboxes, gateway.snapshots, gateway.data, gateway.ports, gateway.console, gateway.template_ops
        ),
        server,
    )
    template_service_pb2_grpc.add_TemplateServiceServicer_to_server(TemplateServicer(gateway.template_ops), server)
    code_service_pb2_grpc.add_CodeServiceServicer_to_server(CodeServicer(CodeOps(gateway.data)), server)
    port_forward_service_pb2_grpc.add_PortForwardServiceServicer_to_server(PortForwardServicer(gateway.data), server)
    # HTTP/JSON, calling this gateway's own gRPC port (known once the server is bound: served lazily). Its socket is
    # bound now, so a taken address fails the start and the bound address (port 0: any free port) is published in
    # the registration's metadata (`http`).
    http_socket = bind_http_socket(context.settings.http_listen)
    bound_host, bound_port = http_socket.getsockname()[:2]
    context.registration_metadata["http"] = f"{bound_host}:{bound_port}"

    async def close_unserved_socket() -> None:  # a gateway stopped before its registration: nothing serves it
        if context.registration is None:
            http_socket.close()

    context.on_shutdown.append(close_unserved_socket)
    live = DesktopLive(context, gateway.data, context.registration_metadata["http"])
    desktop_service_pb2_grpc.add_DesktopServiceServicer_to_server(DesktopServicer(gateway.data, live), server)
    metrics_service_pb2_grpc.add_SandboxMetricsServiceServicer_to_server(SandboxMetricsServicer(gateway.data), server)
    context.every(30, gateway.builds.reap, "template-build-reaper")
    context.every(context.settings.template_image_prune_seconds, gateway.template_images.prune, "template-images")
    context.on_shutdown.append(gateway.builds.close)
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(gateway.admin), server)
    upkeep = SandboxUpkeep(gateway.sandboxes)
    context.every(context.settings.reaper_interval_seconds, upkeep.reap_expired, "sandbox-reaper")
    context.every(300, upkeep.sweep_tombstones, "tombstone-sweeper")
    notifications = await wire_notifications(server, context)  # WatchEvents and webhooks

    # The E2B SDKs' control plane and in-sandbox traffic (docs/e2b.md): bound now, so a taken address fails the start
    # before anything below waits for the registration.
    try:
        await e2b_listeners.start(context)
    except BaseException:
        http_socket.close()
        raise

    async def start_http() -> None:
        while context.registration is None:
            await asyncio.sleep(0.05)
        http = HttpGateway(context.registration.instance.address)
        runner = web.AppRunner(http.app(live.routes), access_log=None)
        await runner.setup()
        await web.SockSite(runner, http_socket).start()

        async def stop_http() -> None:
            await runner.cleanup()
            await http.close()

        context.on_shutdown.insert(0, stop_http)

    context.http_task = asyncio.create_task(start_http(), name="http-gateway")
    return [
        sandbox_service_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name,
        nodes_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
        template_service_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
        code_service_pb2.DESCRIPTOR.services_by_name["CodeService"].full_name,
        port_forward_service_pb2.DESCRIPTOR.services_by_name["PortForwardService"].full_name,
        desktop_service_pb2.DESCRIPTOR.services_by_name["DesktopService"].full_name,
        metrics_service_pb2.DESCRIPTOR.services_by_name["SandboxMetricsService"].full_name,
        *notifications,
    ]
