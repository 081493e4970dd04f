"""The event loop the synchronous SDK runs the async one on: one loop on a daemon thread, shared by every sync object
of the process, so `Sandbox` and `AsyncSandbox` behave the same."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Loop:
    """One event loop on a daemon thread, shared by every sync object of the process."""

    _shared: Loop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="microvm-sandbox-sdk", daemon=True)
        self.thread.start()

    @classmethod
    def shared(cls) -> Loop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def soon(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs `coroutine` without waiting for it (from any thread, the loop's own included)."""
        if threading.current_thread() is self.thread:
            self.loop.create_task(coroutine)
        else:
            asyncio.run_coroutine_threadsafe(coroutine, self.loop)
