"""What the E2B tests share: an installation's two E2B doors, two tenants, and the unmodified e2b SDK pointed at the
doors by its own environment variables (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import aiohttp
import pytest

from tests.inprocess import Caller, InProcessNode, tenant_caller


@dataclass
class E2bDoors:
    api: str  # http://host:port of the control plane
    sandbox: str  # http://host:port of the in-sandbox traffic door
    alice: Caller
    bob: Caller
    http: aiohttp.ClientSession

    async def call(self, verb: str, path: str, key: str | None = None, **kwargs) -> tuple[int, object]:
        """A raw request to the control plane with `key` (alice's by default; "" for none): status and JSON."""
        headers = kwargs.pop("headers", {})
        if key is None:
            key = self.alice.key
        if key:
            headers["X-API-Key"] = key
        async with self.http.request(verb, self.api + path, headers=headers, **kwargs) as response:
            text = await response.text()
            return response.status, (await response.json(content_type=None)) if text else None

    async def traffic(self, sandbox: str, port: int, path: str = "/", **headers: str) -> tuple[int, str]:
        """A raw request to the traffic door for `port` of `sandbox`: status and body."""
        names = {"E2b-Sandbox-Id": sandbox, "E2b-Sandbox-Port": str(port)}
        names.update({name.replace("_", "-"): value for name, value in headers.items()})
        async with self.http.get(self.sandbox + path, headers=names) as response:
            return response.status, await response.text()


async def e2b_doors(node: InProcessNode, monkeypatch: pytest.MonkeyPatch):
    """The doors of `node`'s gateway and the SDK's environment for tenant alice (an async generator for a fixture)."""
    alice = await tenant_caller(node, f"e2b-alice-{node.node}")
    bob = await tenant_caller(node, f"e2b-bob-{node.node}")
    api = "http://" + await node.registration_metadata("gateway", "e2b_api")
    sandbox = "http://" + await node.registration_metadata("gateway", "e2b_sandbox")
    monkeypatch.setenv("E2B_API_URL", api)
    monkeypatch.setenv("E2B_SANDBOX_URL", sandbox)
    monkeypatch.setenv("E2B_API_KEY", alice.key)
    async with aiohttp.ClientSession() as http:
        yield E2bDoors(api, sandbox, alice, bob, http)


def envelopes(body: bytes) -> list[tuple[int, bytes]]:
    """A Connect streaming body's envelopes: (flags, message) each."""
    found = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        found.append((flags, body[5 : 5 + length]))
        body = body[5 + length :]
    return found
