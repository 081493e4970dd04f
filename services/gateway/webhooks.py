"""Webhooks and WebhookServicer: the public WebhookService (create, get, list, delete, deliveries).

A webhook is a record of its tenant (`/microvm/webhooks/<tenant>/<id>`): another tenant's is NOT_FOUND exactly like
one that does not exist. Its deliveries are made in the background by one gateway replica
(services/gateway/webhook_dispatch.py); what they came to is its delivery log, read here.
"""

from __future__ import annotations

import re
import secrets

from google.protobuf import json_format

from microvm.sandbox.v1 import webhook_service_pb2 as api
from microvm.sandbox.v1 import webhook_service_pb2_grpc
from microvm.types.v1 import webhook_pb2
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.records import WEBHOOK_DELIVERIES, WEBHOOKS, Records
from services.gateway.access import current_principal
from services.gateway.events import check_types
from services.gateway.sandbox_requests import validate_labels
from services.gateway.webhook_targets import check_url, networks, new_secret

WEBHOOK_ID = re.compile(r"^wh-[0-9a-f]{12}$")
MAX_PER_TENANT = 20
DESCRIPTION_MOST_BYTES = 256


def webhook_id(name: str) -> str:
    """The id in `webhooks/{id}`; INVALID_ARGUMENT for another shape, NOT_FOUND for an id no webhook can have."""
    if not name.startswith("webhooks/"):
        raise InvalidArgument(f"{name[:128]!r} is not a webhook name; expected webhooks/{{id}}", reason="INVALID_NAME")
    ident = name.removeprefix("webhooks/")
    if not WEBHOOK_ID.fullmatch(ident):
        raise not_found(ident)
    return ident


def not_found(ident: str) -> NotFound:
    return NotFound(
        f"webhook {ident[:64]} does not exist",
        reason="WEBHOOK_NOT_FOUND",
        metadata={"webhook": f"webhooks/{ident[:64]}"},
    )


def to_public(record: webhook_pb2.WebhookRecord, cursor: str = "") -> api.Webhook:
    return api.Webhook(
        name=f"webhooks/{record.id}",
        url=record.url,
        event_types=record.event_types,
        labels=record.labels,
        description=record.description,
        create_time=record.create_time,
        cursor=cursor,
    )


def delivery_to_public(entry: webhook_pb2.WebhookDeliveryRecord) -> api.WebhookDelivery:
    delivery = api.WebhookDelivery(
        id=entry.id,
        state=entry.state,
        attempts=entry.attempts,
        last_status_code=entry.last_status_code,
        last_error=entry.last_error,
    )
    json_format.Parse(entry.body or "{}", delivery.event, ignore_unknown_fields=True)
    for field in ("first_attempt_time", "last_attempt_time", "next_attempt_time"):
        if entry.HasField(field):
            getattr(delivery, field).CopyFrom(getattr(entry, field))
    return delivery


class Webhooks:
    """The caller's tenant's webhooks."""

    def __init__(self, etcd, allowed_networks=()) -> None:
        self.records = Records(etcd)
        self.allowed = networks(allowed_networks)

    @staticmethod
    def tenant() -> str:
        principal = current_principal()
        return principal.tenant if principal is not None else "default"

    async def create(self, request: api.CreateWebhookRequest) -> api.CreateWebhookResponse:
        wanted = request.webhook
        check_url(wanted.url, self.allowed)
        types = check_types(wanted.event_types)
        validate_labels(wanted.labels)
        if len(wanted.description.encode()) > DESCRIPTION_MOST_BYTES:
            raise InvalidArgument(f"description must be at most {DESCRIPTION_MOST_BYTES} bytes")
        tenant = self.tenant()
        if len(await self.records.list(WEBHOOKS, tenant)) >= MAX_PER_TENANT:
            raise ResourceExhausted(
                f"a tenant may have at most {MAX_PER_TENANT} webhooks; delete one first", reason="WEBHOOK_LIMIT"
            )
        principal = current_principal()
        record = webhook_pb2.WebhookRecord(
            id=f"wh-{secrets.token_hex(6)}",
            tenant=tenant,
            url=wanted.url,
            event_types=sorted(types),
            labels=wanted.labels,
            description=wanted.description,
            secret=new_secret(),
            creator=principal.id if principal is not None else "",
        )
        record.create_time.GetCurrentTime()
        await self.records.transaction(
            compare=[self.records.unchanged(WEBHOOKS, 0, tenant, record.id)],
            success=[self.records.put_op(WEBHOOKS, record, tenant, record.id)],
        )
        return api.CreateWebhookResponse(webhook=to_public(record), secret=record.secret)

    async def _record(self, name: str) -> webhook_pb2.WebhookRecord:
        ident = webhook_id(name)
        stored = await self.records.get(WEBHOOKS, self.tenant(), ident)
        if stored is None:
            raise not_found(ident)
        return stored.message

    async def _cursor(self, record: webhook_pb2.WebhookRecord) -> str:
        stored = await self.records.get(WEBHOOK_DELIVERIES, record.tenant, record.id)
        return stored.message.cursor if stored else ""

    async def get(self, name: str) -> api.Webhook:
        record = await self._record(name)
        return to_public(record, await self._cursor(record))

    async def list(self) -> list[api.Webhook]:
        tenant = self.tenant()
        logs = {s.parts[1]: s.message.cursor for s in await self.records.list(WEBHOOK_DELIVERIES, tenant)}
        found = [s.message for s in await self.records.list(WEBHOOKS, tenant)]
        found.sort(key=lambda r: (r.create_time.ToNanoseconds(), r.id))
        return [to_public(record, logs.get(record.id, "")) for record in found]

    async def delete(self, name: str) -> None:
        record = await self._record(name)
        await self.records.transaction(
            compare=[],
            success=[
                self.records.delete_op(WEBHOOKS, record.tenant, record.id),
                self.records.delete_op(WEBHOOK_DELIVERIES, record.tenant, record.id),
            ],
        )

    async def deliveries(self, name: str) -> list[api.WebhookDelivery]:
        record = await self._record(name)
        stored = await self.records.get(WEBHOOK_DELIVERIES, record.tenant, record.id)
        entries = list(stored.message.deliveries) if stored else []
        return [delivery_to_public(entry) for entry in reversed(entries)]


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    async def CreateWebhook(self, request, context):
        return await self.webhooks.create(request)

    async def GetWebhook(self, request, context):
        return api.GetWebhookResponse(webhook=await self.webhooks.get(request.name))

    async def ListWebhooks(self, request, context):
        return api.ListWebhooksResponse(webhooks=await self.webhooks.list())

    async def DeleteWebhook(self, request, context):
        await self.webhooks.delete(request.name)
        return api.DeleteWebhookResponse()

    async def ListWebhookDeliveries(self, request, context):
        return api.ListWebhookDeliveriesResponse(deliveries=await self.webhooks.deliveries(request.webhook))
