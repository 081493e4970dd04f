"""Token-signing keys are sealed in etcd: whoever reads etcd cannot mint a token; a replica with another
key-encryption key refuses to start; keys stored in clear by an older auth are sealed; rotation keeps every token
valid until it expires. Its own etcd: signing keys are one installation's, and the session's etcd holds others'."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microvm.auth.v1 import auth_pb2
from microvm.types.v1 import auth_pb2 as auth_types
from services.auth.credentials import CredentialStore, b64
from services.auth.sealing import Sealer
from services.common.errors import FailedPrecondition, Unauthenticated
from services.common.pki import create_kek
from services.common.records import SIGNING_KEYS, Records
from services.common.registry import etcd_client
from tests.etcd import LocalEtcd

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def own_etcd(tmp_path_factory):
    server = LocalEtcd(tmp_path_factory.mktemp("signing-etcd"))
    yield server
    server.stop()


@pytest.fixture
async def etcd(own_etcd):
    client = etcd_client([own_etcd.endpoint])
    await client.connect()
    await client.delete_prefix(SIGNING_KEYS.prefix.encode())
    yield client
    await client.close()


def sealer(path) -> Sealer:
    create_kek(path)
    return Sealer.load(path)


async def admin_key(store: CredentialStore) -> auth_pb2.Principal:
    await store.create_tenant("default", auth_types.Quota())
    key_id, _ = await store.create_api_key("default", "root", auth_types.ROLE_ADMIN)
    return auth_pb2.Principal(id="root", tenant="default", role=auth_types.ROLE_ADMIN, key_id=key_id)


def forge(kid: str, private: Ed25519PrivateKey, principal: auth_pb2.Principal) -> str:
    header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": kid}).encode())
    payload = b64(
        json.dumps(
            {
                "sub": principal.id,
                "tenant": principal.tenant,
                "role": principal.role,
                "key": principal.key_id,
                "exp": 2**40,
                "iat": 0,
            }
        ).encode()
    )
    return f"{header}.{payload}.{b64(private.sign(f'{header}.{payload}'.encode()))}"


async def test_whoever_reads_etcd_cannot_mint_an_admin_token(etcd, tmp_path):
    store = CredentialStore(etcd, 900, sealer(tmp_path / "kek"))
    admin = await admin_key(store)
    await store.issue_token(admin)  # a signing key exists now
    stolen = await Records(etcd).list(SIGNING_KEYS)
    assert stolen
    for stored in stolen:
        record = stored.message
        assert not record.private_key_pem
        # What an attacker with etcd can try: the key in clear, or the sealed bytes taken as a key.
        candidates = [record.sealed_private_key[i : i + 32] for i in range(0, len(record.sealed_private_key) - 31)]
        for raw in candidates:
            token = forge(record.kid, Ed25519PrivateKey.from_private_bytes(raw), admin)
            with pytest.raises(Unauthenticated):
                await store.check_token(token)
        raw_private = store._signing[record.kid].private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        assert raw_private not in (await etcd.get(SIGNING_KEYS.key(record.kid))).value


async def test_a_replica_with_another_key_encryption_key_refuses_to_start(etcd, tmp_path):
    await CredentialStore(etcd, 900, sealer(tmp_path / "a")).rotate()
    with pytest.raises(FailedPrecondition) as refused:
        await CredentialStore(etcd, 900, sealer(tmp_path / "b")).open_signing_keys()
    assert refused.value.reason == "TOKEN_KEK_MISMATCH"


async def test_a_key_stored_in_clear_is_sealed_and_its_tokens_stay_valid(etcd, tmp_path):
    legacy = Ed25519PrivateKey.generate()
    pem = legacy.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    record = auth_types.SigningKeyRecord(kid="legacy01", private_key_pem=pem)
    record.create_time.GetCurrentTime()
    await Records(etcd).put(SIGNING_KEYS, record, "legacy01")
    store = CredentialStore(etcd, 900, sealer(tmp_path / "kek"))
    admin = await admin_key(store)
    old_token = forge("legacy01", legacy, admin)  # what the old auth had issued

    assert await store.open_signing_keys() == 1
    sealed = (await Records(etcd).get(SIGNING_KEYS, "legacy01")).message
    assert not sealed.private_key_pem and sealed.sealed_private_key and sealed.public_key
    assert (await store.check_token(old_token)).role == auth_types.ROLE_ADMIN
    # Another replica (same key-encryption key) opens it too.
    again = CredentialStore(etcd, 900, Sealer.load(tmp_path / "kek"))
    assert (await again.check_token(old_token)).key_id == admin.key_id


async def test_rotation_keeps_older_tokens_valid_until_they_expire(etcd, tmp_path):
    store = CredentialStore(etcd, 900, sealer(tmp_path / "kek"))
    admin = await admin_key(store)
    first, _ = await store.issue_token(admin)
    await store.rotate()
    second, _ = await store.issue_token(admin)
    assert first.split(".")[0] != second.split(".")[0]  # another kid signs now
    replica = CredentialStore(etcd, 900, Sealer.load(tmp_path / "kek"))
    for token in (first, second):
        assert (await replica.check_token(token)).id == "root"


async def test_a_key_encryption_key_others_can_read_is_refused(tmp_path):
    path = tmp_path / "kek"
    create_kek(path)
    os.chmod(path, 0o644)
    with pytest.raises(FailedPrecondition) as refused:
        Sealer.load(path)
    assert refused.value.reason == "TOKEN_KEK_EXPOSED"
