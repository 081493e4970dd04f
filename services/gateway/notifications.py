"""Wiring of what tells callers about their sandboxes: the EventService (WatchEvents, events.py)."""

from __future__ import annotations

from microvm.sandbox.v1 import event_service_pb2, event_service_pb2_grpc
from services.common.server import ServiceContext
from services.common.settings import GatewaySettings
from services.gateway.events import EventServicer, SandboxEvents


async def wire_notifications(server, context: ServiceContext[GatewaySettings]) -> list[str]:
    """Adds the services to `server`; returns their full names (for reflection)."""
    events = SandboxEvents(context.etcd, context.settings.operator_tenants)
    event_service_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(events), server)
    return [event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name]
