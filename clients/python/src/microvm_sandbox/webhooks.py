"""Webhooks (docs/events.md): your sandboxes' events POSTed to a URL, signed, retried, logged (WebhookService).

    hook = await client.webhooks.create("https://ci.example.com/mvm", types=["failed", "expired"])
    save(hook.secret)                                   # shown only now
    for delivery in await client.webhooks.deliveries(hook.id):
        print(delivery.event.type, delivery.state, delivery.attempts, delivery.last_error)

A receiver checks each POST with `verify_signature(secret, headers, body)` and deduplicates on `X-Mvm-Delivery`.
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from microvm.sandbox.v1 import webhook_service_pb2 as api
from microvm.sandbox.v1 import webhook_service_pb2_grpc
from microvm.types.v1 import webhook_pb2
from microvm_sandbox.events import SandboxEvent, event_type_name, event_type_number

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient


def webhook_name(webhook: str) -> str:
    """`webhooks/ID` for an id or a name."""
    return webhook if webhook.startswith("webhooks/") else f"webhooks/{webhook}"


def _time(stamp: Timestamp) -> datetime.datetime | None:
    return stamp.ToDatetime(tzinfo=datetime.UTC) if stamp.seconds or stamp.nanos else None


@dataclass(frozen=True)
class WebhookInfo:
    """A webhook. `types` empty: every kind of event; `cursor`: the last event it handled. `secret` is set only in
    what `create` returns."""

    name: str
    url: str
    types: list[str]
    labels: dict[str, str]
    description: str
    create_time: datetime.datetime | None
    cursor: str = ""
    secret: str = ""

    @property
    def id(self) -> str:
        """The webhook's id (`name` without `webhooks/`)."""
        return self.name.removeprefix("webhooks/")

    @classmethod
    def of(cls, webhook: api.Webhook, secret: str = "") -> WebhookInfo:
        """From the API's message."""
        return cls(
            name=webhook.name,
            url=webhook.url,
            types=[event_type_name(t) for t in webhook.event_types],
            labels=dict(webhook.labels),
            description=webhook.description,
            create_time=_time(webhook.create_time),
            cursor=webhook.cursor,
            secret=secret,
        )


@dataclass(frozen=True)
class WebhookDelivery:
    """One event's delivery: `state` is `pending` (being retried), `succeeded` or `failed` (attempts used up);
    `last_status_code` 0 means no answer (refused, timed out, not allowed)."""

    id: str
    event: SandboxEvent
    state: str
    attempts: int
    last_status_code: int
    last_error: str
    first_attempt_time: datetime.datetime | None
    last_attempt_time: datetime.datetime | None
    next_attempt_time: datetime.datetime | None

    @classmethod
    def of(cls, delivery: api.WebhookDelivery) -> WebhookDelivery:
        """From the API's message."""
        return cls(
            id=delivery.id,
            event=SandboxEvent.of(delivery.event),
            state=webhook_pb2.WebhookDeliveryState.Name(delivery.state).removeprefix("WEBHOOK_DELIVERY_STATE_").lower(),
            attempts=delivery.attempts,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            first_attempt_time=_time(delivery.first_attempt_time),
            last_attempt_time=_time(delivery.last_attempt_time),
            next_attempt_time=_time(delivery.next_attempt_time),
        )


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: float = 300) -> bool:
    """Whether a POST came from this installation's webhook with `secret`: X-Mvm-Signature is the HMAC-SHA256 of
    `X-Mvm-Timestamp + "." + body`, and the timestamp is within `tolerance_seconds` of now (0: not checked)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    timestamp, given = lowered.get("x-mvm-timestamp", ""), lowered.get("x-mvm-signature", "")
    if not timestamp.isdigit() or not given.startswith("sha256="):
        return False
    if tolerance_seconds and abs(time.time() - int(timestamp)) > tolerance_seconds:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given.removeprefix("sha256="), expected)


class AsyncWebhooks:
    """`client.webhooks`: create, list, get and delete your tenant's webhooks, and read their deliveries."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._stub = webhook_service_pb2_grpc.WebhookServiceStub(client.channel)  # type: ignore[no-untyped-call]

    async def create(
        self,
        url: str,
        types: Iterable[str | int] = (),
        labels: Mapping[str, str] | None = None,
        description: str = "",
    ) -> WebhookInfo:
        """A webhook POSTing to `url` the events of the kinds in `types` (default: all) of the sandboxes with every one
        of `labels`, from now on. Its `secret` is in the answer and nowhere else: keep it."""
        webhook = api.Webhook(url=url, labels=dict(labels or {}), description=description)
        webhook.event_types.extend(event_type_number(t) for t in types)
        reply = await self.client.call("CreateWebhook", api.CreateWebhookRequest(webhook=webhook), stub=self._stub)
        return WebhookInfo.of(reply.webhook, reply.secret)

    async def list(self) -> builtins.list[WebhookInfo]:
        """Your tenant's webhooks, oldest first."""
        reply = await self.client.call("ListWebhooks", api.ListWebhooksRequest(), idempotent=True, stub=self._stub)
        return [WebhookInfo.of(webhook) for webhook in reply.webhooks]

    async def get(self, webhook: str) -> WebhookInfo:
        """One webhook by id or name (NotFoundError when there is none)."""
        request = api.GetWebhookRequest(name=webhook_name(webhook))
        return WebhookInfo.of((await self.client.call("GetWebhook", request, idempotent=True, stub=self._stub)).webhook)

    async def delete(self, webhook: str) -> None:
        """Deletes a webhook and its delivery log (an attempt in flight may still arrive)."""
        await self.client.call("DeleteWebhook", api.DeleteWebhookRequest(name=webhook_name(webhook)), stub=self._stub)

    async def deliveries(self, webhook: str) -> builtins.list[WebhookDelivery]:
        """The webhook's recent deliveries, newest first."""
        request = api.ListWebhookDeliveriesRequest(webhook=webhook_name(webhook))
        reply = await self.client.call("ListWebhookDeliveries", request, idempotent=True, stub=self._stub)
        return [WebhookDelivery.of(delivery) for delivery in reply.deliveries]
