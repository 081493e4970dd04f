"""`Client.events` and `Client.webhooks` for synchronous code: the `AsyncEvents` and `AsyncWebhooks` methods run
on the SDK's loop (microvm_sandbox.events and microvm_sandbox.webhooks have the details).

    with Client() as client:
        for event in client.events.watch(types=["failed"]):
            print(event.sandbox_id, event.message)
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Mapping

from microvm_sandbox.events import AsyncEvents, AsyncEventStream, SandboxEvent
from microvm_sandbox.files_sync import Runner
from microvm_sandbox.webhooks import AsyncWebhooks, WebhookDelivery, WebhookInfo


class EventStream:
    """The events of one watch for a plain `for` loop (see `AsyncEventStream`); `cursor` is where it stands."""

    def __init__(self, inner: AsyncEventStream, run: Runner) -> None:
        self.aio, self._run = inner, run
        self._events = inner.__aiter__()

    @property
    def cursor(self) -> str:
        """The cursor of the last event or progress message received: resume from it."""
        return self.aio.cursor

    def __iter__(self) -> Iterator[SandboxEvent]:
        while True:
            try:
                yield self._run(self._events.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        """Stops watching. Safe to call twice."""
        self._run(self.aio.close())

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Events:
    """`Client.events`: the methods of `AsyncEvents`, same arguments."""

    def __init__(self, inner: AsyncEvents, run: Runner) -> None:
        self.aio, self._run = inner, run

    def watch(
        self,
        types: Iterable[str | int] = (),
        labels: Mapping[str, str] | None = None,
        since: str = "",
        follow: bool = True,
        tenant: str = "",
    ) -> EventStream:
        """Events of the sandboxes with every one of `labels`, of the kinds in `types`, after cursor `since` (default:
        from now); `follow=False` stops once what had happened when it began has come."""
        return EventStream(self.aio.watch(types, labels, since, follow, tenant), self._run)


class Webhooks:
    """`Client.webhooks`: the methods of `AsyncWebhooks`, same arguments."""

    def __init__(self, inner: AsyncWebhooks, run: Runner) -> None:
        self.aio, self._run = inner, run

    def create(
        self,
        url: str,
        types: Iterable[str | int] = (),
        labels: Mapping[str, str] | None = None,
        description: str = "",
    ) -> WebhookInfo:
        """A webhook POSTing the events of the kinds in `types` of the sandboxes with every one of `labels` to `url`;
        its `secret` is in the answer only."""
        return self._run(self.aio.create(url, types, labels, description))

    def list(self) -> builtins.list[WebhookInfo]:
        """Your tenant's webhooks, oldest first."""
        return self._run(self.aio.list())

    def get(self, webhook: str) -> WebhookInfo:
        """One webhook by id or name."""
        return self._run(self.aio.get(webhook))

    def delete(self, webhook: str) -> None:
        """Deletes a webhook and its delivery log."""
        self._run(self.aio.delete(webhook))

    def deliveries(self, webhook: str) -> builtins.list[WebhookDelivery]:
        """The webhook's recent deliveries, newest first."""
        return self._run(self.aio.deliveries(webhook))
