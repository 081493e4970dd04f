"""`Sandbox.get_metrics` and `watch_metrics` for synchronous code (microvm_sandbox.sandbox_metrics)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import TYPE_CHECKING

from microvm_sandbox.sandbox_metrics import ResourceUsage

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.sync_loop import Loop


class MetricsMethods:
    aio: AsyncSandbox
    _loop: Loop

    def get_metrics(
        self, start: datetime.datetime | None = None, end: datetime.datetime | None = None
    ) -> list[ResourceUsage]:
        """The samples taken from `start` (default: all that are kept, the last hour) until `end` (default: now)."""
        return self._loop.run(self.aio.get_metrics(start, end))

    def watch_metrics(self, start: datetime.datetime | None = None) -> Iterator[ResourceUsage]:
        """The kept samples from `start`, then each new one as it is taken, until the sandbox ends."""
        stream = self.aio.watch_metrics(start)
        try:
            while True:
                try:
                    yield self._loop.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(stream.aclose())  # type: ignore[attr-defined]
