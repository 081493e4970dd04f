"""WebhookDispatcher: which gateway replica delivers which webhook, one replica per webhook.

Every replica looks at the webhooks each POLL_SECONDS. One that nobody delivers is taken by the first replica whose
transaction finds its lock absent (`/microvm/webhook-locks/<tenant>/<id>`, written under that replica's own lease),
which runs its WebhookFeed (webhook_delivery.py). A replica that stops revokes its lease, so its locks go at once; one
that dies loses them when its lease runs out (`lease_ttl_seconds`), and another replica takes them over from the
cursor in the delivery log. Everything here runs in background tasks owned by the dispatcher: no request waits for it.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog

from services.common import deadlines
from services.common.records import WEBHOOK_LOCKS, WEBHOOKS, RecordCorrupt, Records
from services.common.tasks import cancel_and_wait
from services.gateway.events import SandboxEvents
from services.gateway.webhook_delivery import Holding, WebhookFeed, WebhookSender

log = structlog.get_logger()
POLL_SECONDS = 1.0
Parts = tuple[str, str]


class WebhookDispatcher:
    def __init__(self, context, events: SandboxEvents) -> None:
        self.etcd, self.records, self.events = context.etcd, Records(context.etcd), events
        self.settings, self.instance = context.settings, context.instance_id
        self.ttl = max(2, int(context.common.lease_ttl_seconds))
        self.sender = WebhookSender(context.settings)
        self.feeds: dict[Parts, asyncio.Task] = {}
        self.holdings: dict[Parts, Holding] = {}
        self.lease = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def _run(self) -> None:
        while True:
            try:
                await self._keep_lease()
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away: the feeds find out on their own; try again
                log.warning("webhook_dispatch_failed", error=str(exc))
            await asyncio.sleep(POLL_SECONDS)

    async def _keep_lease(self) -> None:
        if self.lease is not None:
            async with asyncio.timeout(deadlines.QUICK):
                reply = await self.lease.refresh()
            if reply is None or reply.TTL <= 0:  # ran out (we stalled, or etcd restarted): our locks are gone
                log.warning("webhook_lease_lost", held=len(self.feeds))
                self.lease = None
                await self._drop_all()
        if self.lease is None:
            self.lease = await self.etcd.lease(self.ttl)

    async def _read(self):
        webhooks, locks = {}, {}
        for kv in await self.etcd.get_prefix(WEBHOOKS.scope()):
            parts = WEBHOOKS.parts_of(kv.key)
            try:
                webhooks[parts] = (WEBHOOKS.decode(kv.value), kv.create_revision) if parts else None
            except RecordCorrupt as exc:
                log.error("webhook_unreadable", key=kv.key.decode(errors="replace"), error=str(exc))
        for kv in await self.etcd.get_prefix(WEBHOOK_LOCKS.scope()):
            if (parts := WEBHOOK_LOCKS.parts_of(kv.key)) is not None:
                locks[parts] = kv.value
        return {k: v for k, v in webhooks.items() if v is not None}, locks

    async def reconcile(self) -> None:
        """Stops the feeds this replica may no longer run, starts those of webhooks nobody delivers."""
        webhooks, locks = await self._read()
        for parts in list(self.feeds):
            mine = locks.get(parts) == self.holdings[parts].value
            if self.feeds[parts].done() or parts not in webhooks or not mine:
                await self._drop(parts, release=mine)
        for parts, (record, created) in webhooks.items():
            if parts not in self.feeds and parts not in locks and self.lease is not None:
                await self._take(parts, record, created)

    async def _take(self, parts: Parts, record, created: int) -> None:
        lock = WEBHOOK_LOCKS.message(instance_id=self.instance, token=secrets.token_hex(8))
        lock.time.FromNanoseconds(int(time.time() * 1e9))
        tx = self.etcd.transactions
        if not await self.records.transaction(
            compare=[tx.version(WEBHOOK_LOCKS.key(*parts)) == 0, tx.version(WEBHOOKS.key(*parts)) > 0],
            success=[self.records.put_op(WEBHOOK_LOCKS, lock, *parts, lease=self.lease)],
        ):
            return  # another replica was quicker
        holding = Holding(WEBHOOK_LOCKS.encode(lock), created)
        feed = WebhookFeed(self.etcd, record, holding, self.events, self.sender, self.settings)
        self.holdings[parts] = holding
        self.feeds[parts] = asyncio.create_task(feed.run(), name=f"webhook-{parts[1]}")
        log.info("webhook_taken", tenant=parts[0], webhook=parts[1])

    async def _drop(self, parts: Parts, release: bool) -> None:
        await cancel_and_wait(self.feeds.pop(parts))
        holding = self.holdings.pop(parts)
        if release:
            tx = self.etcd.transactions
            await self.records.transaction(
                compare=[tx.value(WEBHOOK_LOCKS.key(*parts)) == holding.value],
                success=[self.records.delete_op(WEBHOOK_LOCKS, *parts)],
            )

    async def _drop_all(self) -> None:
        for parts in list(self.feeds):
            await cancel_and_wait(self.feeds.pop(parts))
            self.holdings.pop(parts, None)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self._drop_all()
        lease, self.lease = self.lease, None
        if lease is not None:  # the locks go with it: another replica takes over at once
            try:
                await asyncio.wait_for(lease.revoke(), 2)
            except Exception as exc:
                log.warning("webhook_lease_revoke_failed", error=str(exc))
        await self.sender.close()
