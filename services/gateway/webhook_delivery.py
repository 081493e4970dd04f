"""WebhookFeed: one webhook's events, delivered in order by the replica holding its lock (webhook_dispatch.py).

Each event is POSTed as JSON, signed (`X-Mvm-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`,
`X-Mvm-Timestamp`), with `X-Mvm-Delivery` the same on every attempt, until the endpoint answers 2xx or
`webhook_max_attempts` attempts failed (waits doubling from `webhook_retry_seconds`, at most 5 min); then the next.
Every attempt is written to the webhook's delivery log, and the cursor with the event's final outcome: a restart
goes on after the last event handled, so at least once, and more than once only for the event in flight when the
replica stopped (its receiver deduplicates on X-Mvm-Delivery). Every write compares the lock this replica holds:
a replica that lost it (its lease ran out) stops before it writes anything.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
import structlog
from google.protobuf import json_format, timestamp_pb2

from microvm.sandbox.v1 import event_service_pb2 as events_api
from microvm.types.v1 import event_pb2, webhook_pb2
from services.common.records import WEBHOOK_DELIVERIES, WEBHOOK_LOCKS, WEBHOOKS, Records
from services.common.settings import GatewaySettings
from services.gateway.events import Cursor, OutOfRange, Progress, SandboxEvents, matcher
from services.gateway.webhook_targets import CheckedResolver, check_url, networks, signature

log = structlog.get_logger()
PENDING = webhook_pb2.WEBHOOK_DELIVERY_STATE_PENDING
SUCCEEDED = webhook_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED
FAILED = webhook_pb2.WEBHOOK_DELIVERY_STATE_FAILED
LONGEST_WAIT_SECONDS = 300.0
# A cursor moved by events of others (or none) is written at most this often.
PROGRESS_WRITE_SECONDS = 30.0


class LockLost(Exception):
    """This replica no longer delivers the webhook (its lock is gone, or the webhook is)."""


def _stamp(seconds: float | None = None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() if seconds is None else seconds) * 1e9))
    return stamp


class WebhookSender:
    """HTTP POSTs to webhooks: one session (connection pool, checked resolver) for every webhook of the replica."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.allowed = networks(settings.webhook_allowed_networks)
        self.timeout = aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.allowed), limit=200, limit_per_host=8)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, trust_env=False)
        return self._session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """(HTTP status, why it failed): (0, reason) when there was no answer."""
        try:
            check_url(url, self.allowed)  # the allowed networks may have changed since the webhook was made
            async with self.session().post(url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
        except TimeoutError:
            return 0, f"no answer within {self.timeout.total:g} s"
        except Exception as exc:  # refused, unreachable, not allowed, a broken answer: all one failed attempt
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return 0, message[:500]
        return status, "" if 200 <= status < 300 else f"answered HTTP {status}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class Holding:
    """The lock this replica holds on a webhook: its value, compared by every write."""

    value: bytes
    create_revision: int  # of the webhook's record: where delivery starts when nothing was delivered yet


class WebhookFeed:
    def __init__(
        self,
        etcd,
        record: webhook_pb2.WebhookRecord,
        holding: Holding,
        events: SandboxEvents,
        sender: WebhookSender,
        settings: GatewaySettings,
    ) -> None:
        self.etcd, self.records = etcd, Records(etcd)
        self.record, self.holding, self.events, self.sender = record, holding, events, sender
        self.attempts, self.first_wait = settings.webhook_max_attempts, settings.webhook_retry_seconds
        self.log_size = settings.webhook_log_size
        self.log = webhook_pb2.WebhookDeliveryLog()
        self.written = 0.0

    @property
    def parts(self) -> tuple[str, str]:
        return self.record.tenant, self.record.id

    async def run(self) -> None:
        """Delivers until cancelled or the lock is lost; a failure (etcd away) starts again from the log's cursor."""
        pause = 0.5
        while True:
            try:
                await self._follow()
            except LockLost:
                return
            except OutOfRange:
                await self._gap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook_feed_failed", webhook=self.record.id, tenant=self.record.tenant, error=str(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _follow(self) -> None:
        stored = await self.records.get(WEBHOOK_DELIVERIES, *self.parts)
        self.log = stored.message if stored else webhook_pb2.WebhookDeliveryLog()
        after = Cursor.parse(self.log.cursor) if self.log.cursor else Cursor(self.holding.create_revision)
        wants = matcher(self.record.labels, frozenset(self.record.event_types))
        async for item in self.events.follow(self.record.tenant, after, wants):
            if isinstance(item, Progress):
                cursor = str(item.cursor)
                if cursor != self.log.cursor and time.monotonic() - self.written >= PROGRESS_WRITE_SECONDS:
                    await self._write(None, cursor)
            else:
                await self._deliver(item)

    async def _gap(self) -> None:
        """The cursor was compacted (no replica delivered for longer than etcd keeps history): say so in the log and
        go on from now."""
        head = await self.events.history.head()
        entry = webhook_pb2.WebhookDeliveryRecord(
            id=f"{self.record.id}-gap-{head}",
            cursor=str(head),
            state=FAILED,
            last_error=f"events after {self.log.cursor or 'the webhook was created'} up to {head} were compacted "
            "before they could be delivered (no gateway delivered for longer than etcd keeps history)",
        )
        entry.last_attempt_time.CopyFrom(_stamp())
        log.warning("webhook_events_lost", webhook=self.record.id, tenant=self.record.tenant, up_to=head)
        await self._write(entry, str(head))

    async def _deliver(self, event: events_api.SandboxEvent) -> None:
        body = json.dumps(json_format.MessageToDict(event), separators=(",", ":")).encode()
        delivery_id = f"{self.record.id}-{event.cursor}"
        earlier = next((d for d in self.log.deliveries if d.id == delivery_id), None)  # from before a restart
        entry = webhook_pb2.WebhookDeliveryRecord(
            id=delivery_id, cursor=event.cursor, event_type=event.type, sandbox=event.sandbox, body=body.decode()
        )
        entry.state, entry.attempts = PENDING, earlier.attempts if earlier is not None else 0
        entry.first_attempt_time.CopyFrom(earlier.first_attempt_time if earlier is not None else _stamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "microvm-sandbox-webhooks/1",
            "X-Mvm-Delivery": delivery_id,
            "X-Mvm-Event": event_pb2.SandboxEventType.Name(event.type),
            "X-Mvm-Webhook": f"webhooks/{self.record.id}",
        }
        while True:
            timestamp = int(time.time())
            headers["X-Mvm-Timestamp"] = str(timestamp)
            headers["X-Mvm-Signature"] = signature(self.record.secret, timestamp, body)
            status, error = await self.sender.post(self.record.url, body, headers)
            entry.attempts += 1
            entry.last_status_code, entry.last_error = status, error
            entry.last_attempt_time.CopyFrom(_stamp())
            entry.ClearField("next_attempt_time")
            if not error or entry.attempts >= self.attempts:
                entry.state = SUCCEEDED if not error else FAILED
                await self._write(entry, event.cursor)
                return
            wait = min(self.first_wait * 2 ** (entry.attempts - 1), LONGEST_WAIT_SECONDS)
            entry.next_attempt_time.CopyFrom(_stamp(time.time() + wait))
            await self._write(entry, None)
            await asyncio.sleep(wait)

    async def _write(self, entry: webhook_pb2.WebhookDeliveryRecord | None, cursor: str | None) -> None:
        """The log with `entry` in it (in place of an earlier version) and the cursor moved to `cursor`, if this
        replica still holds the lock and the webhook still exists; LockLost otherwise."""
        log_ = webhook_pb2.WebhookDeliveryLog()
        log_.CopyFrom(self.log)
        if entry is not None:
            kept = [d for d in log_.deliveries if d.id != entry.id] + [entry]
            del log_.deliveries[:]
            log_.deliveries.extend(kept[-self.log_size :])
        if cursor is not None:
            log_.cursor = cursor
        log_.update_time.CopyFrom(_stamp())
        tx = self.etcd.transactions
        if not await self.records.transaction(
            compare=[
                tx.value(WEBHOOK_LOCKS.key(*self.parts)) == self.holding.value,
                tx.version(WEBHOOKS.key(*self.parts)) > 0,
            ],
            success=[self.records.put_op(WEBHOOK_DELIVERIES, log_, *self.parts)],
        ):
            raise LockLost(self.record.id)
        self.log, self.written = log_, time.monotonic()
