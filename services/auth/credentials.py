"""API keys and signed tokens.

An API key is `mvm_<key id>_<secret>`: 32 random bytes, shown once, stored in etcd only as sha256 (the
secret has 256 bits of entropy, so a fast hash is enough; comparison is constant-time). A key in E2B's form (for the
E2B SDKs, docs/e2b.md) is `e2b_<secret>`, the secret 20 random bytes as 40 lowercase hex (160 bits); it names no key
id, so its id is the first 16 hex of the secret's sha256 (`e2b_key_id`). A token is a JWS
compact serialization signed with Ed25519 (`alg: EdDSA`, `kid` of the signing key in the header), valid for
`token_ttl_seconds`. Signing keys live in etcd sealed (sealing.py: nobody who reads etcd can mint a token);
rotation adds a new active key while older ones keep verifying until every token they signed has expired, so no
caller sees a failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from microvm.auth.v1 import auth_pb2
from microvm.types.v1 import auth_pb2 as auth_types
from services.auth.sealing import Sealer
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.common.records import API_KEYS, SIGNING_KEYS, TENANTS, Records

PREFIX = "mvm_"
E2B_PREFIX = "e2b_"


def e2b_key_id(credential: str) -> str:
    """The key id of an `e2b_` key: derived from its secret, which is all the key holds."""
    return digest(credential[len(E2B_PREFIX) :])[:16]


def split_api_key(credential: str) -> tuple[str, str] | None:
    """(key id, secret) of an API key in either form; None when it is neither."""
    if credential.startswith(E2B_PREFIX):
        secret = credential[len(E2B_PREFIX) :]
        return (e2b_key_id(credential), secret) if secret else None
    if credential.startswith(PREFIX):
        key_id, _, secret = credential[len(PREFIX) :].partition("_")
        return (key_id, secret) if key_id and secret else None
    return None


log = structlog.get_logger()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class SigningKey:
    kid: str
    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey
    created: float


class CredentialStore:
    def __init__(self, etcd, token_ttl: int, sealer: Sealer) -> None:
        self.records = Records(etcd)
        self.token_ttl = token_ttl
        self.sealer = sealer
        self._signing: dict[str, SigningKey] = {}

    # --- tenants and API keys --------------------------------------------------------------------
    async def create_tenant(self, tenant: str, quota: auth_types.Quota) -> None:
        await self.records.put(TENANTS, auth_types.TenantRecord(quota=quota), tenant)

    async def tenant_quota(self, tenant: str) -> auth_types.Quota:
        stored = await self.records.get(TENANTS, tenant)
        if stored is None:
            raise NotFound(f"tenant {tenant} does not exist", reason="TENANT_NOT_FOUND")
        return stored.message.quota

    async def create_api_key(self, tenant: str, principal: str, role: int, e2b_format: bool = False) -> tuple[str, str]:
        await self.tenant_quota(tenant)  # the tenant must exist
        if role not in (auth_types.ROLE_ADMIN, auth_types.ROLE_DEVELOPER, auth_types.ROLE_VIEWER):
            raise InvalidArgument("role must be ADMIN, DEVELOPER or VIEWER")
        if e2b_format:
            secret = secrets.token_hex(20)
            key_id, credential = e2b_key_id(E2B_PREFIX + secret), E2B_PREFIX + secret
        else:
            key_id = secrets.token_hex(8)
            secret = secrets.token_urlsafe(32)
            credential = f"{PREFIX}{key_id}_{secret}"
        record = auth_types.ApiKeyRecord(
            tenant=tenant, principal=principal or f"key-{key_id}", role=role, sha256=digest(secret)
        )
        record.create_time.GetCurrentTime()
        await self.records.put(API_KEYS, record, key_id)
        return key_id, credential

    async def revoke(self, key_id: str) -> None:
        stored = await self.records.get(API_KEYS, key_id)
        if stored is None:
            raise NotFound(f"API key {key_id} does not exist", reason="API_KEY_NOT_FOUND")
        stored.message.revoked = True
        await self.records.put(API_KEYS, stored.message, key_id)

    async def _key(self, key_id: str) -> auth_types.ApiKeyRecord | None:
        if not key_id or "/" in key_id:
            return None
        stored = await self.records.get(API_KEYS, key_id)
        return stored.message if stored else None

    async def check_api_key(self, credential: str) -> auth_pb2.Principal:
        split = split_api_key(credential)
        if split is None:
            raise Unauthenticated("malformed API key", reason="BAD_CREDENTIAL")
        key_id, secret = split
        record = await self._key(key_id)
        # The same answer for a missing and a wrong key: no hint which keys exist.
        if record is None or not hmac.compare_digest(record.sha256, digest(secret)):
            raise Unauthenticated("invalid API key", reason="BAD_CREDENTIAL")
        if record.revoked:
            raise Unauthenticated("this API key was revoked", reason="CREDENTIAL_REVOKED")
        return auth_pb2.Principal(id=record.principal, tenant=record.tenant, role=record.role, key_id=key_id)

    # --- signing keys and tokens -------------------------------------------------------------------
    async def open_signing_keys(self) -> int:
        """Opens every stored signing key (at start: a replica with the wrong key-encryption key fails at once,
        FAILED_PRECONDITION TOKEN_KEK_MISMATCH) and seals any legacy key stored in clear. Returns how many."""
        for stored in await self.records.list(SIGNING_KEYS):
            if stored.message.private_key_pem:
                await self._seal_legacy(stored)
        await self._load_signing_keys()
        return len(self._signing)

    async def _load_signing_keys(self) -> None:
        for stored in await self.records.list(SIGNING_KEYS):
            record = stored.message
            if record.kid in self._signing:
                continue
            if record.sealed_private_key:
                try:
                    raw = self.sealer.open(record.kid, record.sealed_private_key, record.sealed_with)
                except FailedPrecondition as exc:
                    if exc.reason != "SIGNING_KEY_CORRUPT":
                        raise
                    log.error("signing_key_unusable", kid=record.kid, error=exc.message)
                    continue
                private = Ed25519PrivateKey.from_private_bytes(raw)
            else:  # legacy, in clear: usable until open_signing_keys seals it
                private = serialization.load_pem_private_key(record.private_key_pem.encode(), password=None)
            self._signing[record.kid] = SigningKey(
                record.kid, private, private.public_key(), record.create_time.ToNanoseconds() / 1e9
            )

    def _sealed_record(self, kid: str, private: Ed25519PrivateKey) -> auth_types.SigningKeyRecord:
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return auth_types.SigningKeyRecord(
            kid=kid,
            sealed_private_key=self.sealer.seal(kid, raw),
            sealed_with=self.sealer.key_id,
            public_key=public,
        )

    async def _seal_legacy(self, stored) -> None:
        """Rewrites a key stored in clear as a sealed one, unless another replica changed it meanwhile."""
        legacy = stored.message
        private = serialization.load_pem_private_key(legacy.private_key_pem.encode(), password=None)
        record = self._sealed_record(legacy.kid, private)
        record.create_time.CopyFrom(legacy.create_time)
        if await self.records.transaction(
            compare=[self.records.unchanged(SIGNING_KEYS, stored.revision, legacy.kid)],
            success=[self.records.put_op(SIGNING_KEYS, record, legacy.kid)],
        ):
            log.info("signing_key_sealed", kid=legacy.kid)

    async def rotate(self) -> str:
        """Adds a new active signing key; older ones keep verifying the tokens they signed."""
        private = Ed25519PrivateKey.generate()
        kid = secrets.token_hex(6)
        record = self._sealed_record(kid, private)
        record.create_time.GetCurrentTime()
        created = record.create_time.ToNanoseconds() / 1e9
        await self.records.put(SIGNING_KEYS, record, kid)
        self._signing[kid] = SigningKey(kid, private, private.public_key(), created)
        # Keys older than two token lifetimes signed nothing that is still valid.
        for old in [k for k in self._signing.values() if k.created < created - 2 * self.token_ttl]:
            await self.records.delete(SIGNING_KEYS, old.kid)
            self._signing.pop(old.kid, None)
        return kid

    async def _active_key(self) -> SigningKey:
        await self._load_signing_keys()
        if not self._signing:
            await self.rotate()
        return max(self._signing.values(), key=lambda k: k.created)

    async def issue_token(
        self, principal: auth_pb2.Principal, scope: str = "", resource: str = "", ttl: int = 0
    ) -> tuple[str, int]:
        """A token for `principal`; with `scope`, one good only for that scope on `resource` (a desktop's live view),
        never for the API."""
        key = await self._active_key()
        expires = int(time.time()) + (ttl or self.token_ttl)
        header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": key.kid}).encode())
        claims = {
            "sub": principal.id,
            "tenant": principal.tenant,
            "role": principal.role,
            "key": principal.key_id,
            "exp": expires,
            "iat": int(time.time()),
        }
        if scope:
            claims.update(scope=scope, res=resource)
        payload = b64(json.dumps(claims).encode())
        signature = b64(key.private.sign(f"{header}.{payload}".encode()))
        return f"{header}.{payload}.{signature}", expires

    async def check_token(self, token: str, scopes: tuple[str, ...] = (), resource: str = "") -> auth_pb2.Principal:
        """The principal of a valid token. Without `scopes` only an API token passes; with them, only a token of one
        of those scopes for `resource`."""
        try:
            header_b64, payload_b64, signature_b64 = token.split(".")
            header = json.loads(unb64(header_b64))
            payload = json.loads(unb64(payload_b64))
            signature = unb64(signature_b64)
        except (ValueError, json.JSONDecodeError):
            raise Unauthenticated("malformed token", reason="BAD_CREDENTIAL") from None
        if not isinstance(header, dict) or not isinstance(header.get("kid", ""), str):
            raise Unauthenticated("malformed token", reason="BAD_CREDENTIAL")
        if header.get("alg") != "EdDSA":  # never trust the token to pick its own algorithm
            raise Unauthenticated("token algorithm must be EdDSA", reason="BAD_CREDENTIAL")
        key = self._signing.get(header.get("kid", ""))
        if key is None:
            await self._load_signing_keys()
            key = self._signing.get(header.get("kid", ""))
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="BAD_CREDENTIAL")
        try:
            key.public.verify(signature, f"{header_b64}.{payload_b64}".encode())
        except InvalidSignature:
            raise Unauthenticated("token signature does not verify", reason="BAD_CREDENTIAL") from None
        # Signed by us, so well-formed unless a key leaked: checked all the same, a token is input.
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("exp"), int | float)
            or not all(isinstance(payload.get(k), str) for k in ("sub", "tenant", "key"))
            or not isinstance(payload.get("role"), int)
        ):
            raise Unauthenticated("malformed token", reason="BAD_CREDENTIAL")
        if payload["exp"] < time.time():
            raise Unauthenticated("token expired", reason="CREDENTIAL_EXPIRED")
        scope = payload.get("scope", "")
        if not scopes and scope:
            raise Unauthenticated(f"a {scope} token is good for nothing else", reason="BAD_CREDENTIAL")
        if scopes and (scope not in scopes or payload.get("res") != resource):
            raise PermissionDenied(f"this token is not for {' or '.join(scopes)} of {resource}", reason="WRONG_SCOPE")
        # A token dies with the API key it was bought with.
        record = await self._key(str(payload.get("key", "")))
        if record is None or record.revoked:
            raise Unauthenticated("the API key behind this token was revoked", reason="CREDENTIAL_REVOKED")
        return auth_pb2.Principal(
            id=payload["sub"], tenant=payload["tenant"], role=payload["role"], key_id=payload["key"]
        )

    async def check_scoped(self, token: str, scopes: tuple[str, ...], resource: str) -> tuple[auth_pb2.Principal, str]:
        """A scoped token's principal and scope (one of `scopes`, for `resource`)."""
        principal = await self.check_token(token, scopes, resource)
        return principal, json.loads(unb64(token.split(".")[1]))["scope"]

    async def authenticate(self, credential: str) -> auth_pb2.Principal:
        if not credential:
            raise Unauthenticated(
                "no credential: send `authorization: Bearer <API key or token>`", reason="NO_CREDENTIAL"
            )
        if credential.startswith((PREFIX, E2B_PREFIX)):
            return await self.check_api_key(credential)
        return await self.check_token(credential)
