"""Wiring of what tells callers about their sandboxes: the EventService (WatchEvents, events.py), the WebhookService
(webhooks.py) and the background delivery of webhooks (webhook_dispatch.py)."""

from __future__ import annotations

from microvm.sandbox.v1 import event_service_pb2, event_service_pb2_grpc, webhook_service_pb2, webhook_service_pb2_grpc
from services.common.server import ServiceContext
from services.common.settings import GatewaySettings
from services.gateway.events import EventServicer, SandboxEvents
from services.gateway.webhook_dispatch import WebhookDispatcher
from services.gateway.webhooks import Webhooks, WebhookServicer


async def wire_notifications(server, context: ServiceContext[GatewaySettings]) -> list[str]:
    """Adds the services to `server` and starts webhook delivery; returns the services' full names."""
    events = SandboxEvents(
        context.etcd,
        context.settings.operator_tenants,
        context.instance_id,
        lease=lambda: context.registration.lease if context.registration else None,
    )
    event_service_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(events), server)
    webhooks = Webhooks(context.etcd, context.settings.webhook_allowed_networks)
    webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(webhooks), server)
    dispatcher = WebhookDispatcher(context, events)
    dispatcher.start()
    context.on_shutdown.append(dispatcher.close)
    return [
        event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
        webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    ]
