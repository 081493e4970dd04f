"""GuestServer: a JSON-lines server inside a guest (the code server, the desktop server) reached over a tunnel to
its unix socket: one connection per call, the request as one line, the answers as lines; a refusal becomes the
caller's status. A guest without the server is FAILED_PRECONDITION with the reason the service names."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, NotFound, ServiceError, Unavailable
from services.relay.guest_io import sandbox_id
from services.relay.tunnel import GuestTunnel

MAX_LINE_BYTES = 64 << 20  # one answer: a result with its images, a screenshot


@dataclass
class GuestServer:
    open_stream: Callable
    socket: str  # the server's socket in the guest
    what: str  # "code server", "desktop server": said in errors
    missing: str  # why a sandbox lacks it and what to do, after "{sandbox} has no ..."
    missing_reason: str  # the status reason when it is missing
    failed_reason: str  # the status reason when it answers nonsense
    refusal: Callable[[dict], ServiceError]

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
        tunnel = await self.connect(sandbox)
        try:
            await tunnel.write(json.dumps(request).encode() + b"\n")
            answer = await self.answer(tunnel)
            if answer.get("type") not in ((expect,) if isinstance(expect, str) else expect):
                raise self._failed(f"answered {answer.get('type')!r} to {request['op']}")
            return answer
        finally:
            await tunnel.close()
