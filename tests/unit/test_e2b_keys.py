"""API keys in E2B's form (`e2b_` + 40 lowercase hex, `mvm keys create --e2b-format`): minted by auth, accepted by the
gateway (its local check and auth's) and so by the unmodified E2B SDK, refused when wrong or revoked, and the way the
CLI asks the installation's host for one."""

from __future__ import annotations

import re

import grpc
import pytest
from e2b import AsyncSandbox
from e2b.exceptions import AuthenticationException

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import auth_pb2 as auth_types
from mvm_cli.keys import supervisor_argv
from mvm_cli.main import parse
from services.supervisor.bootstrap import create_api_key

pytestmark = pytest.mark.timeout(120)
E2B_KEY = re.compile(r"^e2b_[0-9a-f]{40}$")


@pytest.fixture(scope="module")
async def auth(installation):
    return auth_pb2_grpc.AuthServiceStub(installation.channel(await installation.address("auth")))


async def e2b_key(auth, tenant: str) -> auth_pb2.CreateApiKeyResponse:
    request = auth_pb2.CreateApiKeyRequest(tenant=tenant, role=auth_types.ROLE_DEVELOPER, e2b_format=True)
    return await auth.CreateApiKey(request, timeout=10)


async def test_an_e2b_format_key_drives_the_e2b_sdk_as_its_tenant(doors, auth, installation):
    created = await e2b_key(auth, f"e2b-alice-{installation.node}")
    assert E2B_KEY.match(created.secret), created.secret
    sandbox = await AsyncSandbox.create("base", timeout=60, api_key=created.secret)
    try:
        # It is alice's sandbox: her mvm_ key sees it, bob's does not.
        name = api.GetSandboxRequest(name=f"sandboxes/{sandbox.sandbox_id}")
        await doors.alice.stub.GetSandbox(name, metadata=doors.alice.metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as theirs:
            await doors.bob.stub.GetSandbox(name, metadata=doors.bob.metadata, timeout=10)
        assert theirs.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await AsyncSandbox.list(api_key=created.secret).next_items()
        assert sandbox.sandbox_id in {s.sandbox_id for s in listed}
    finally:
        await sandbox.kill()


async def test_a_wrong_or_revoked_e2b_key_is_refused(doors, auth, installation):
    created = await e2b_key(auth, f"e2b-alice-{installation.node}")
    wrong = created.secret[:-1] + ("0" if created.secret[-1] != "0" else "1")
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.list(api_key=wrong).next_items()
    await auth.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id=created.key_id), timeout=10)
    status, body = await doors.call("GET", "/v2/sandboxes", key=created.secret)
    assert (status, body["code"]) == (401, 401)


async def test_two_e2b_keys_are_distinct_keys(auth, installation):
    first, second = [await e2b_key(auth, f"e2b-alice-{installation.node}") for _ in range(2)]
    assert first.secret != second.secret and first.key_id != second.key_id


async def test_the_operator_path_mints_an_e2b_key(installation):
    request = auth_pb2.CreateApiKeyRequest(
        tenant=f"e2b-alice-{installation.node}", role=auth_types.ROLE_VIEWER, e2b_format=True
    )
    created = await create_api_key([installation.etcd_endpoint], None, request)
    assert E2B_KEY.match(created.secret)


def test_mvm_keys_create_asks_the_supervisor_for_an_e2b_key(tmp_path):
    args = parse(["keys", "create", "--tenant", "team", "--role", "viewer", "--e2b-format"])
    argv = supervisor_argv(args, tmp_path)
    assert argv[1:4] == ["-m", "services.supervisor.main", "create-key"]
    assert argv[4:] == [
        "--state-dir",
        str(tmp_path),
        "--tenant",
        "team",
        "--principal",
        "",
        "--key-role",
        "viewer",
        "--e2b-format",
    ]
