"""The relay's GuestServer keeps a connection whose exchange ended cleanly for the next call to the same sandbox
(services/relay/guest_server.py): fewer connects in the guest per call. Fakes at the edge: the tunnels are scripted
stand-ins; what is kept, what is closed and what is retried is the point."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument, ServiceError
from services.relay import guest_server
from services.relay.guest_server import GuestServer


class ScriptedTunnel:
    """Answers each request line with the next scripted answers (b"" = the guest closed the connection)."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers, self.sent = answers, []
        self.ended = self.closed = False
        self.buffered = False

    async def write(self, data: bytes) -> None:
        if self.ended:
            raise BrokenPipeError("closed")
        self.sent.append(json.loads(data))

    async def readline(self, limit: int) -> bytes:
        line = self.answers.pop(0) if self.answers else b""
        if not line:
            self.ended = True
        return line

    async def close(self) -> None:
        self.closed = True


def answer(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def server_with(tunnels: list[ScriptedTunnel]) -> tuple[GuestServer, list[ScriptedTunnel]]:
    opened = []

    def refusal(found: dict) -> ServiceError:
        return InvalidArgument(found["value"])

    server = GuestServer(None, "/run/x.sock", "test server", "test server", "MISSING", "FAILED", refusal)

    async def connect(sandbox: str):
        opened.append(tunnels.pop(0))
        return opened[-1]

    server.connect = connect
    return server, opened


async def test_a_clean_exchange_keeps_its_connection_for_the_next_call():
    tunnel = ScriptedTunnel([answer(type="contexts"), answer(type="contexts")])
    server, opened = server_with([tunnel])
    for _ in range(2):
        assert (await server.call("sandboxes/a", {"op": "list_contexts"}, "contexts"))["type"] == "contexts"
    assert opened == [tunnel] and len(tunnel.sent) == 2 and not tunnel.closed


async def test_a_kept_connection_the_guest_closed_is_replaced_once_and_the_call_goes_through():
    stale = ScriptedTunnel([answer(type="contexts"), b""])  # answers once, then the server restarted
    fresh = ScriptedTunnel([answer(type="contexts")])
    server, opened = server_with([stale, fresh])
    await server.call("sandboxes/a", {"op": "list_contexts"}, "contexts")
    await server.call("sandboxes/a", {"op": "list_contexts"}, "contexts")
    assert opened == [stale, fresh] and stale.closed and not fresh.closed


async def test_a_new_connection_that_fails_is_not_retried():
    server, opened = server_with([ScriptedTunnel([b""]), ScriptedTunnel([answer(type="contexts")])])
    with pytest.raises(ServiceError, match="closed the connection"):
        await server.call("sandboxes/a", {"op": "list_contexts"}, "contexts")
    assert len(opened) == 1 and opened[0].closed


async def test_refusals_and_unexpected_answers_close_their_connection():
    refused = ScriptedTunnel([answer(type="error", refused=True, name="bad_request", value="no such op")])
    odd = ScriptedTunnel([answer(type="surprise")])
    server, opened = server_with([refused, odd])
    with pytest.raises(InvalidArgument, match="no such op"):
        await server.call("sandboxes/a", {"op": "x"}, "contexts")
    with pytest.raises(ServiceError, match="answered 'surprise'"):
        await server.call("sandboxes/a", {"op": "list_contexts"}, "contexts")
    assert refused.closed and odd.closed and server._idle.get("sandboxes/a", []) == []


async def test_idle_connections_are_bounded_per_sandbox_and_stale_ones_let_go(monkeypatch):
    tunnels = [ScriptedTunnel([answer(type="contexts")]) for _ in range(4)]
    server, _ = server_with(list(tunnels))
    for tunnel in tunnels[:3]:
        await server.release("sandboxes/a", tunnel)
    assert [t.closed for t in tunnels[:3]] == [True, False, False]  # the oldest beyond MAX_IDLE
    clock = [1000.0]
    monkeypatch.setattr(guest_server.time, "monotonic", lambda: clock[0])
    await server.release("sandboxes/b", tunnels[3])
    clock[0] += guest_server.IDLE_SECONDS + 1
    tunnel, kept = await server.acquire("sandboxes/b")  # too old to trust: a new one
    assert tunnels[3].closed and not kept
