"""A small asyncio client for QEMU's machine protocol (QMP) over its unix socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from services.common.errors import FailedPrecondition, Unavailable


class QmpError(Exception):
    pass


class QmpClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self, timeout: float = 5.0) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), timeout)
            await asyncio.wait_for(self._reader.readline(), timeout)  # greeting
            await self.execute("qmp_capabilities", timeout=timeout)
        except (TimeoutError, OSError, QmpError) as exc:
            await self.close()
            raise Unavailable(
                f"QMP at {self.path} does not answer: {exc or 'timeout'}", reason="VMM_UNAVAILABLE"
            ) from None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        if self._writer is None:
            raise Unavailable(f"QMP at {self.path} is not connected", reason="VMM_UNAVAILABLE")
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
            while True:
                line = await asyncio.wait_for(self._reader.readline(), timeout)
                if not line:
                    raise QmpError("QMP connection closed")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise FailedPrecondition(f"VMM refused {command}: {reply['error'].get('desc')}", reason="VMM_ERROR")
                return reply.get("return")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except Exception:
                pass
        self._reader = self._writer = None
