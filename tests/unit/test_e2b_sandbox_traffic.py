"""The E2B in-sandbox traffic door (services/gateway/e2b/sandbox_traffic.py) and the per-sandbox access token
(access_token.py), against an in-process installation (fake VMM: the guest's loopback is this host's, so a server on
127.0.0.1 here is a server on every sandbox's loopback): which credential reaches which sandbox, in E2B's shapes, the
HTTP forward to any other port (header and domain forms), and the token's confinement at our gRPC API itself."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiohttp import web
from e2b import AsyncSandbox

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import port_forward_service_pb2 as forward
from microvm.sandbox.v1 import port_forward_service_pb2_grpc, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b import sandbox_traffic
from tests.etcd import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def sandboxes(doors):
    """Two sandboxes of alice, each with its access token."""
    made = [await AsyncSandbox.create("base", timeout=600) for _ in range(2)]
    yield [(s.sandbox_id, s.connection_config.sandbox_headers["X-Access-Token"]) for s in made]
    for sandbox in made:
        await sandbox.kill()


@pytest.fixture(scope="module")
async def guest_server():
    """An HTTP server on the guests' loopback: echoes the method, path, a header and the body."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        text = f"{request.method} {request.path_qs} {request.headers.get('X-Probe', '-')} {body.decode()}"
        return web.Response(text=text, headers={"X-Served-By": "guest"})

    app = web.Application(client_max_size=16 << 20)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def test_the_access_token_reaches_a_guest_port(doors, sandboxes, guest_server):
    sandbox, token = sandboxes[0]
    headers = {"E2b-Sandbox-Id": sandbox, "E2b-Sandbox-Port": str(guest_server), "X-Access-Token": token}
    async with doors.http.post(
        doors.sandbox + "/hello?x=1", headers={**headers, "X-Probe": "p"}, data=b"payload"
    ) as response:
        assert response.status == 200
        assert response.headers["X-Served-By"] == "guest"
        assert await response.text() == "POST /hello?x=1 p payload"


async def test_an_api_key_reaches_a_guest_port_too(doors, sandboxes, guest_server):
    sandbox, _ = sandboxes[0]
    status, text = await doors.traffic(sandbox, guest_server, "/k", X_API_Key=doors.alice.key)
    assert (status, text) == (200, "GET /k - ")


async def test_the_domain_form_names_port_and_sandbox_in_the_host(doors, sandboxes, guest_server):
    sandbox, token = sandboxes[0]
    headers = {"Host": f"{guest_server}-{sandbox}.e2b.example.test", "X-Access-Token": token}
    async with doors.http.get(doors.sandbox + "/via-host", headers=headers) as response:
        assert (response.status, await response.text()) == (200, "GET /via-host - ")


async def test_nothing_listening_is_502(doors, sandboxes):
    sandbox, token = sandboxes[0]
    status, text = await doors.traffic(sandbox, free_port(), X_Access_Token=token)
    assert status == 502 and "nothing listens" in text


async def test_refusals_are_e2b_shapes(doors, sandboxes, guest_server):
    (first, first_token), (second, _) = sandboxes
    status, text = await doors.traffic(first, guest_server)
    assert status == 401 and '"code": 401' in text
    status, text = await doors.traffic(first, guest_server, X_Access_Token="not-a-token")
    assert status == 401 and '"code": 401' in text
    # A token is for its own sandbox only: another one is not found, as a missing one is.
    assert (await doors.traffic(second, guest_server, X_Access_Token=first_token))[0] == 404
    assert (await doors.traffic("sbx-missing", guest_server, X_Access_Token=first_token))[0] == 404
    assert (await doors.traffic(first, 0, X_Access_Token=first_token))[0] == 400
    async with doors.http.get(doors.sandbox + "/", headers={"X-Access-Token": first_token}) as response:
        assert response.status == 400  # names no sandbox at all


async def test_another_tenants_sandbox_is_404_exactly_as_a_missing_one(doors, sandboxes, guest_server):
    sandbox, _ = sandboxes[0]
    theirs = await doors.traffic(sandbox, guest_server, X_API_Key=doors.bob.key)
    missing = await doors.traffic("sbx-missing", guest_server, X_API_Key=doors.bob.key)
    assert theirs[0] == missing[0] == 404


async def test_envd_and_code_interpreter_ports_go_to_their_handlers_after_the_check(doors, sandboxes, monkeypatch):
    sandbox, token = sandboxes[0]
    for port in (49983, 49999):
        assert (await doors.traffic(sandbox, port, "/health"))[0] == 401  # checked before any handler runs
    assert (await doors.traffic(sandbox, 49983, "/health", X_Access_Token=token))[0] < 300  # envd's health
    # A port whose module does not exist (yet) answers in E2B's shape instead of failing.
    monkeypatch.setitem(sandbox_traffic.PORT_HANDLERS, 49999, "services.gateway.e2b.no_such_module")
    status, text = await doors.traffic(sandbox, 49999, "/contexts", X_Access_Token=token)
    assert status == 501 and "not implemented yet" in text


async def test_the_token_is_confined_to_its_sandbox_at_the_grpc_api(doors, sandboxes):
    (first, token), (second, _) = sandboxes
    metadata = (("authorization", f"Bearer {token}"),)
    stub = sandbox_service_pb2_grpc.SandboxServiceStub(doors.alice.channel)
    reply = await stub.GetSandbox(api.GetSandboxRequest(name=f"sandboxes/{first}"), metadata=metadata, timeout=10)
    assert reply.sandbox.name == f"sandboxes/{first}"
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.GetSandbox(api.GetSandboxRequest(name=f"sandboxes/{second}"), metadata=metadata, timeout=10)
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as lifecycle:
        await stub.DeleteSandbox(api.DeleteSandboxRequest(name=f"sandboxes/{first}"), metadata=metadata, timeout=10)
    assert lifecycle.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as listing:
        await stub.ListSandboxes(api.ListSandboxesRequest(), metadata=metadata, timeout=10)
    assert listing.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A stream names its sandbox in its first message: another one is refused there.
    ports = port_forward_service_pb2_grpc.PortForwardServiceStub(doors.alice.channel)
    target = forward.PortTarget(sandbox=f"sandboxes/{second}", port=free_port())
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in ports.ForwardPort(iter([forward.ForwardPortRequest(target=target)]), metadata=metadata):
            pass
    assert streamed.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_revoked_key_takes_its_sandbox_tokens_with_it(doors, installation):
    auth = auth_pb2_grpc.AuthServiceStub(installation.channel(await installation.address("auth")))
    created = await auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(tenant=f"e2b-alice-{installation.node}", principal="revoked", role=2), timeout=10
    )
    sandbox = await AsyncSandbox.create("base", timeout=120, api_key=created.secret)
    token = sandbox.connection_config.sandbox_headers["X-Access-Token"]
    stub = sandbox_service_pb2_grpc.SandboxServiceStub(doors.alice.channel)
    request = api.GetSandboxRequest(name=f"sandboxes/{sandbox.sandbox_id}")
    metadata = (("authorization", f"Bearer {token}"),)
    await stub.GetSandbox(request, metadata=metadata, timeout=10)  # verified, now cached
    await auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id=created.key_id), timeout=10)
    refused = None
    for _ in range(100):  # the gateway's copy of the key records learns of the revocation by a watch
        try:
            await stub.GetSandbox(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            refused = error.code()
            break
        await asyncio.sleep(0.05)
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    await AsyncSandbox.kill(sandbox.sandbox_id)


async def test_the_traffic_token_header_carries_the_same_token(doors, sandboxes, guest_server):
    # The code interpreter SDK sends the create's trafficAccessToken as E2B-Traffic-Access-Token on its /contexts
    # calls, and no X-Access-Token there.
    sandbox, token = sandboxes[0]
    status, text = await doors.traffic(sandbox, guest_server, "/ctx", E2B_Traffic_Access_Token=token)
    assert (status, text) == (200, "GET /ctx - ")
    status, connected = await doors.call("POST", f"/v2/sandboxes/{sandbox}/connect", json={"timeout": 600})
    assert status == 200 and connected["trafficAccessToken"] == connected["envdAccessToken"]


async def test_large_bodies_cross_the_forward_both_ways(doors, sandboxes, guest_server):
    sandbox, token = sandboxes[0]
    payload = bytes(range(97, 123)) * ((3 << 20) // 26)  # 3 MiB of letters: more than one ForwardPort chunk
    headers = {"E2b-Sandbox-Id": sandbox, "E2b-Sandbox-Port": str(guest_server), "X-Access-Token": token}
    async with doors.http.put(doors.sandbox + "/big", headers=headers, data=payload) as response:
        assert response.status == 200
        assert await response.read() == b"PUT /big - " + payload
