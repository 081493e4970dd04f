"""The gateway's two E2B doors as settings (services/gateway/e2b/listeners.py): bound on port 0 and published in the
registration, off when empty, a bad or taken address refused naming its setting; and a gateway of their own
installation answering the SDK's default-less first call, a list."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from services.common.config import ConfigError
from services.common.records import SERVICES, Records
from services.common.settings import GatewaySettings
from tests.inprocess import etcd_client_for, tenant_caller

pytestmark = pytest.mark.timeout(120)


def test_addresses_are_checked_and_empty_turns_a_door_off():
    GatewaySettings(e2b_api_listen="", e2b_sandbox_listen="").validate()
    GatewaySettings(e2b_api_listen="127.0.0.1:0").validate()
    with pytest.raises(ConfigError, match="gateway.e2b_sandbox_listen"):
        GatewaySettings(e2b_sandbox_listen="nowhere").validate()
    defaults = GatewaySettings()
    assert (defaults.e2b_api_listen, defaults.e2b_sandbox_listen) == ("127.0.0.1:3000", "127.0.0.1:3001")


async def gateway_metadata(installation) -> list[dict[str, str]]:
    records = Records(etcd_client_for(installation.etcd_endpoint))
    return [dict(stored.message.metadata) for stored in await records.list(SERVICES, "gateway")]


async def test_bound_addresses_are_published_and_answer(installation):
    caller = await tenant_caller(installation, f"e2b-listen-{installation.node}")
    api = await installation.registration_metadata("gateway", "e2b_api")
    sandbox = await installation.registration_metadata("gateway", "e2b_sandbox")
    assert not api.endswith(":0") and not sandbox.endswith(":0") and api != sandbox
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{api}/v2/sandboxes", headers={"X-API-Key": caller.key}) as response:
            assert (response.status, await response.json()) == (200, [])
        async with http.get(f"http://{sandbox}/", headers={"E2b-Sandbox-Id": "x", "E2b-Sandbox-Port": "1"}) as response:
            assert response.status == 401


async def test_empty_addresses_leave_the_doors_off(installation):
    before = await gateway_metadata(installation)
    await installation.start(
        "gateway",
        key="gateway-no-e2b",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        e2b_api_listen="",
        e2b_sandbox_listen="",
    )
    try:
        after = await gateway_metadata(installation)
        assert len(after) == len(before) + 1
        assert [m for m in after if "e2b_api" not in m and "e2b_sandbox" not in m] != []
    finally:
        await installation.stop("gateway-no-e2b")


async def test_a_taken_address_fails_the_start_naming_the_setting(installation):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="gateway.e2b_api_listen"):
            await installation.start(
                "gateway",
                key="gateway-taken",
                listen="127.0.0.1:0",
                http_listen="127.0.0.1:0",
                e2b_api_listen=f"127.0.0.1:{port}",
            )
