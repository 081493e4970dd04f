"""GuestServer: a JSON-lines server inside a guest (the code server, the desktop server) reached over a tunnel to
its unix socket: the request as one line, the answers as lines; a refusal becomes the caller's status. A guest
without the server is FAILED_PRECONDITION with the reason the service names.

A connection whose exchange ended cleanly (its last answer read, nothing left over) is kept for the next call to
the same sandbox, up to MAX_IDLE per sandbox for IDLE_SECONDS: opening one costs a round trip to the agent, a
connect in the guest and an accept in the server, each several milliseconds of Python under TCG. One that failed or
was abandoned mid-exchange is closed. A kept connection the guest closed meanwhile (its server restarted, the VM
was restored) is found out before anything was answered on it: the call then goes on a new one, once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import FailedPrecondition, NotFound, ServiceError, Unavailable
from services.relay.guest_io import sandbox_id
from services.relay.tunnel import GuestTunnel

MAX_LINE_BYTES = 64 << 20  # one answer: a result with its images, a screenshot
IDLE_SECONDS = 30.0
MAX_IDLE = 2  # kept connections per sandbox (calls to one sandbox at the same moment take more, and close them)


@dataclass
class GuestServer:
    open_stream: Callable
    socket: str  # the server's socket in the guest
    what: str  # "code server", "desktop server": said in errors
    missing: str  # why a sandbox lacks it and what to do, after "{sandbox} has no ..."
    missing_reason: str  # the status reason when it is missing
    failed_reason: str  # the status reason when it answers nonsense
    refusal: Callable[[dict], ServiceError]
    _idle: dict[str, list[tuple[float, GuestTunnel]]] = field(default_factory=dict)

    async def acquire(self, sandbox: str) -> tuple[GuestTunnel, bool]:
        """A kept connection to the sandbox's server, or a new one; and whether it was kept."""
        kept = self._idle.get(sandbox, [])
        while kept:
            since, tunnel = kept.pop()
            if tunnel.ended or tunnel.closed or time.monotonic() - since > IDLE_SECONDS:
                await tunnel.close()
                continue
            return tunnel, True
        self._idle.pop(sandbox, None)
        return await self.connect(sandbox), False

    async def release(self, sandbox: str, tunnel: GuestTunnel) -> None:
        """Keeps a connection whose exchange ended cleanly; closes the rest, and the oldest beyond MAX_IDLE."""
        if tunnel.ended or tunnel.closed or tunnel.buffered:
            await tunnel.close()
            return
        kept = self._idle.setdefault(sandbox, [])
        kept.append((time.monotonic(), tunnel))
        while len(kept) > MAX_IDLE:
            await kept.pop(0)[1].close()
        for other in [s for s, entries in self._idle.items() if s != sandbox and entries]:
            entries = self._idle[other]
            if time.monotonic() - entries[-1][0] > IDLE_SECONDS:  # a sandbox not called for a while: let go
                for _, stale in self._idle.pop(other):
                    await stale.close()

    async def send_first(self, sandbox: str, request: dict) -> tuple[GuestTunnel, dict]:
        """Sends `request` and reads its first answer, on a kept connection if there is one (again on a new one
        when the kept one turns out closed before answering anything)."""
        tunnel, kept = await self.acquire(sandbox)
        line = json.dumps(request).encode() + b"\n"
        try:
            await tunnel.write(line)
            return tunnel, await self.answer(tunnel)
        except (BrokenPipeError, Unavailable) as exc:
            await tunnel.close()
            gone = isinstance(exc, BrokenPipeError) or exc.reason == "GUEST_SERVER_GONE"
            if not (kept and gone):
                raise
        except BaseException:
            await tunnel.close()
            raise
        tunnel = await self.connect(sandbox)
        try:
            await tunnel.write(line)
            return tunnel, await self.answer(tunnel)
        except BaseException:
            await tunnel.close()
            raise

    async def connect(self, sandbox: str) -> GuestTunnel:
        stream = await self.open_stream(sandbox_id(sandbox))
        try:
            return await GuestTunnel.open(stream, unix_path=self.socket)
        except (NotFound, Unavailable) as exc:
            if exc.reason not in ("SOCKET_NOT_FOUND", "CONNECTION_REFUSED"):
                raise
            raise FailedPrecondition(
                f"{sandbox} has no {self.missing} (nothing listens at {self.socket})", reason=self.missing_reason
            ) from None

    def _failed(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(f"the sandbox's {self.what} {what}", reason=self.failed_reason)

    async def answer(self, tunnel: GuestTunnel) -> dict:
        """The next answer line; a refusal raises its status."""
        try:
            line = await tunnel.readline(MAX_LINE_BYTES)
        except ValueError:
            raise self._failed(f"sent an answer over {MAX_LINE_BYTES} bytes") from None
        if not line:
            raise Unavailable(f"the sandbox's {self.what} closed the connection", reason="GUEST_SERVER_GONE")
        try:
            answer = json.loads(line)
        except ValueError:
            raise self._failed("answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise self._failed("answered a non-object")
        if answer.get("refused"):
            raise self.refusal(answer)
        return answer

    async def call(self, sandbox: str, request: dict, expect: str | tuple[str, ...]) -> dict:
        """One request, one answer of type `expect` (or one of them)."""
        tunnel, answer = await self.send_first(sandbox, request)
        if answer.get("type") not in ((expect,) if isinstance(expect, str) else expect):
            await tunnel.close()
            raise self._failed(f"answered {answer.get('type')!r} to {request['op']}")
        await self.release(sandbox, tunnel)
        return answer
