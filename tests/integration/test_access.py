"""Authentication, tenant isolation, quotas and the audit log, through the real gateway and auth service."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import auth_pb2 as auth_types
from services.auth.sealing import Sealer
from services.common.errors import error_info
from services.common.pki import KEK_FILE
from services.common.records import AUDIT_EVENTS, SIGNING_KEYS, Records
from services.gateway.access import TokenBucket
from tests.guests import Gateway
from tests.integration.test_sandbox_lifecycle import instances

pytestmark = pytest.mark.guest


def auth_stub(stack) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(stack.internal_channel(instances(stack, "auth")[-1].address))


def tenant_key(stack, tenant: str, role=auth_types.ROLE_DEVELOPER, **quota) -> str:
    auth = auth_stub(stack)
    limits = dict(max_sandboxes=20, max_vcpus=40, max_memory_mib=20480, max_snapshot_bytes=50 << 30)
    limits.update(quota)
    auth.CreateTenant(auth_pb2.CreateTenantRequest(tenant=tenant, quota=auth_types.Quota(**limits)), timeout=10)
    return auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(tenant=tenant, principal=f"{tenant}-user", role=role), timeout=10
    ).secret


def test_another_tenant_cannot_touch_anything_and_learns_nothing(tenants):
    a, b, sandbox, snapshot = tenants
    name, snap = sandbox.name, snapshot.name
    attempts = {
        "GetSandbox": lambda: b.stub.GetSandbox(api.GetSandboxRequest(name=name), timeout=10),
        "UpdateSandbox": lambda: b.stub.UpdateSandbox(
            api.UpdateSandboxRequest(sandbox=sandbox_pb2.Sandbox(name=name, labels={"owner": "b"})), timeout=10
        ),
        "Exec": lambda: b.exec(name, ["id"]),
        "ExecInteractive": lambda: list(
            b.stub.ExecInteractive(
                iter(
                    [
                        api.ExecInteractiveRequest(
                            config=api.ExecInteractiveConfig(sandbox=name, process=api.ProcessConfig(argv=["id"]))
                        )
                    ]
                ),
                timeout=10,
            )
        ),
        "WriteFile": lambda: b.write_file(name, "/root/pwned", b"x"),
        "ReadFile": lambda: b.read_file(name, "/etc/hostname"),
        "ListDir": lambda: b.stub.ListDir(api.ListDirRequest(sandbox=name, path="/"), timeout=10),
        "Stat": lambda: b.stub.Stat(api.StatRequest(sandbox=name, path="/"), timeout=10),
        "MakeDir": lambda: b.stub.MakeDir(api.MakeDirRequest(sandbox=name, path="/x"), timeout=10),
        "Remove": lambda: b.stub.Remove(api.RemoveRequest(sandbox=name, path="/etc"), timeout=10),
        "PauseSandbox": lambda: b.stub.PauseSandbox(api.PauseSandboxRequest(name=name), timeout=10),
        "ResumeSandbox": lambda: b.stub.ResumeSandbox(api.ResumeSandboxRequest(name=name), timeout=10),
        "CreateSnapshot": lambda: b.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=name), timeout=60),
        "GetSnapshot": lambda: b.stub.GetSnapshot(api.GetSnapshotRequest(name=snap), timeout=10),
        "RestoreSnapshot": lambda: b.stub.RestoreSnapshot(api.RestoreSnapshotRequest(snapshot=snap), timeout=60),
        "ForkSandbox": lambda: b.stub.ForkSandbox(api.ForkSandboxRequest(name=name, count=1), timeout=60),
        "ExposePort": lambda: b.stub.ExposePort(api.ExposePortRequest(sandbox=name, guest_port=80), timeout=10),
        "DeleteSnapshot": lambda: b.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snap), timeout=10),
        "DeleteSandbox": lambda: b.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), timeout=10),
    }
    successes, codes = [], {}
    for method, attempt in attempts.items():
        try:
            attempt()
            successes.append(method)
        except grpc.RpcError as error:
            codes[method] = error.code()
    print(f"\nadversarial tally over gRPC: {len(attempts)} attempts, {len(successes)} successes")
    assert successes == []
    leaks = {m: c for m, c in codes.items() if c not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)}
    assert leaks == {}
    listed = b.stub.ListSandboxes(api.ListSandboxesRequest(), timeout=10).sandboxes
    assert name not in {s.name for s in listed}
    assert b.stub.ListSnapshots(api.ListSnapshotsRequest(source_sandbox=name), timeout=10).snapshots == []
    # And the owner still has everything.
    assert a.exec(name, ["echo", "mine"]).stdout == b"mine\n"
    assert a.stub.GetSnapshot(api.GetSnapshotRequest(name=snap), timeout=10).snapshot.name == snap


def b64(data) -> str:
    return (
        base64.urlsafe_b64encode(json.dumps(data).encode() if not isinstance(data, bytes) else data)
        .rstrip(b"=")
        .decode()
    )


def token_for(stack, key: str) -> str:
    return auth_stub(stack).ExchangeApiKey(auth_pb2.ExchangeApiKeyRequest(api_key=key), timeout=10).token


def signing_key(stack):
    async def read():
        client = stack.etcd_client()
        await client.connect()
        try:
            return [stored.message for stored in await Records(client).list(SIGNING_KEYS)]
        finally:
            await client.close()

    newest = max(asyncio.run(read()), key=lambda k: k.create_time.ToNanoseconds())
    # etcd holds it sealed: opening it takes the key-encryption key, which only auth's hosts have.
    assert not newest.private_key_pem
    sealer = Sealer.load(stack.pki_dir / KEK_FILE)
    raw = sealer.open(newest.kid, newest.sealed_private_key, newest.sealed_with)
    return newest.kid, Ed25519PrivateKey.from_private_bytes(raw)


def call_with(stack, credential: str) -> grpc.StatusCode:
    try:
        Gateway(stack.gateway_address, credential).stub.ListSandboxes(api.ListSandboxesRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_tokens_work_and_bad_credentials_are_refused(stack):
    key = tenant_key(stack, "tenant-creds")
    token = token_for(stack, key)
    assert call_with(stack, token) == grpc.StatusCode.OK
    header, payload, _ = token.split(".")
    kid, private = signing_key(stack)
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    expired_claims = dict(claims, exp=int(time.time()) - 10)
    expired_body = f"{b64({'alg': 'EdDSA', 'typ': 'JWT', 'kid': kid})}.{b64(expired_claims)}"
    expired = f"{expired_body}.{b64(private.sign(expired_body.encode()))}"
    forged = f"{header}.{b64(dict(claims, tenant='tenant-a'))}.{token.split('.')[2]}"
    none_alg = f"{b64({'alg': 'none', 'kid': kid})}.{payload}."
    hs256 = f"{b64({'alg': 'HS256', 'kid': kid})}.{payload}.{b64(b'x' * 32)}"
    for name, credential in {
        "expired": expired,
        "forged": forged,
        "alg none": none_alg,
        "alg HS256": hs256,
        "garbage": "not-a-token",
        "wrong key": key[:-4] + "AAAA",
    }.items():
        assert call_with(stack, credential) == grpc.StatusCode.UNAUTHENTICATED, name
    key_id = key.split("_")[1]
    auth_stub(stack).RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id=key_id), timeout=10)
    assert call_with(stack, key) == grpc.StatusCode.UNAUTHENTICATED
    assert call_with(stack, token) == grpc.StatusCode.UNAUTHENTICATED  # the token died with its key


def test_viewer_reads_but_may_not_create(stack):
    viewer = Gateway(stack.gateway_address, tenant_key(stack, "tenant-viewer", role=auth_types.ROLE_VIEWER))
    assert viewer.stub.ListSandboxes(api.ListSandboxesRequest(), timeout=10).sandboxes == []
    with pytest.raises(grpc.RpcError) as failure:
        viewer.create()
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_quota_admits_exactly_the_remaining_room_under_a_race(stack):
    racer = Gateway(stack.gateway_address, tenant_key(stack, "tenant-race", max_sandboxes=5))

    def attempt(_):
        try:
            return racer.create()
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attempt, range(50)))
    created = [r for r in results if isinstance(r, sandbox_pb2.Sandbox)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    try:
        assert len(created) == 5
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert error_info(refused[0]).reason == "QUOTA_EXCEEDED"
    finally:
        for sandbox in created:
            racer.delete(sandbox.name)
    # Deleting gave the room back.
    again = racer.create()
    racer.delete(again.name)


def test_audit_chain_verifies_and_tampering_is_detected(stack):
    key = tenant_key(stack, "tenant-audit")
    user = Gateway(stack.gateway_address, key)
    sandbox = user.create()
    user.exec(sandbox.name, ["true"])
    user.delete(sandbox.name)
    auth = auth_stub(stack)
    log = auth.ListAuditEvents(auth_pb2.ListAuditEventsRequest(tenant="tenant-audit"), timeout=10)
    methods = [e.method.rsplit("/", 1)[1] for e in log.events]
    assert methods == ["CreateSandbox", "Exec", "DeleteSandbox"] and log.chain_valid
    assert all(e.result == "OK" and e.target == sandbox.name for e in log.events)

    async def tamper():
        client = stack.etcd_client()
        await client.connect()
        try:
            records = Records(client)
            entry = (await records.get(AUDIT_EVENTS, "tenant-audit", f"{2:020d}")).message
            entry.target = "sandboxes/somebody-else"
            await records.put(AUDIT_EVENTS, entry, "tenant-audit", f"{2:020d}")
        finally:
            await client.close()

    asyncio.run(tamper())
    assert not auth.ListAuditEvents(auth_pb2.ListAuditEventsRequest(tenant="tenant-audit"), timeout=10).chain_valid


def test_token_bucket_refuses_past_the_burst_and_says_when_to_retry():
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert 0 < wait <= 0.1


def test_signing_key_rotation_keeps_earlier_tokens_valid(stack):
    from services.auth.credentials import CredentialStore

    key = tenant_key(stack, "tenant-rotation")
    before = token_for(stack, key)

    async def rotate():
        client = stack.etcd_client()
        await client.connect()
        try:
            return await CredentialStore(client, 900, Sealer.load(stack.pki_dir / KEK_FILE)).rotate()
        finally:
            await client.close()

    new_kid = asyncio.run(rotate())
    after = token_for(stack, key)
    header = json.loads(base64.urlsafe_b64decode(after.split(".")[0] + "=="))
    assert header["kid"] == new_kid  # new tokens are signed with the new key
    assert call_with(stack, before) == grpc.StatusCode.OK  # and the old ones still work
    assert call_with(stack, after) == grpc.StatusCode.OK
