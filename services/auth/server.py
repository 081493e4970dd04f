"""Wiring and handlers of the auth service (AuthService)."""

from __future__ import annotations

from pathlib import Path

import structlog

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth import permissions
from services.auth.audit import AuditLog
from services.auth.credentials import CredentialStore
from services.auth.metrics import CredentialMetrics, QuotaMetrics
from services.auth.quotas import TenantQuotas
from services.auth.sealing import Sealer
from services.common.errors import InvalidArgument
from services.common.pki import KEK_FILE, create_kek
from services.common.records import (
    API_KEYS,
    AUDIT_EVENTS,
    AUDIT_HEADS,
    QUOTA_RESERVATIONS,
    QUOTA_USAGE,
    SIGNING_KEYS,
    TENANTS,
    Records,
)
from services.common.server import ServiceContext
from services.common.settings import AuthSettings

log = structlog.get_logger()
# A scoped token lives at most a day: an E2B sandbox access token must outlive its sandbox (24 h by default).
MAX_SCOPED_TTL_SECONDS = 86400
AUTH_KINDS = (TENANTS, API_KEYS, SIGNING_KEYS, QUOTA_USAGE, QUOTA_RESERVATIONS, AUDIT_EVENTS, AUDIT_HEADS)


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, etcd, settings: AuthSettings, sealer: Sealer) -> None:
        self.credentials = CredentialStore(etcd, settings.token_ttl_seconds, sealer)
        self.quotas = TenantQuotas(etcd, self.credentials)
        self.audit = AuditLog(etcd)

    async def CreateTenant(self, request, context):
        if not request.tenant:
            raise InvalidArgument("tenant is required")
        await self.credentials.create_tenant(request.tenant, request.quota)
        return auth_pb2.CreateTenantResponse(tenant=request.tenant)

    async def CreateApiKey(self, request, context):
        key_id, secret = await self.credentials.create_api_key(
            request.tenant, request.principal, request.role, request.e2b_format
        )
        return auth_pb2.CreateApiKeyResponse(key_id=key_id, secret=secret)

    async def RevokeApiKey(self, request, context):
        await self.credentials.revoke(request.key_id)
        return auth_pb2.RevokeApiKeyResponse()

    async def ExchangeApiKey(self, request, context):
        principal = await self.credentials.check_api_key(request.api_key)
        token, expires = await self.credentials.issue_token(principal)
        response = auth_pb2.ExchangeApiKeyResponse(token=token)
        response.expire_time.FromSeconds(expires)
        return response

    async def IssueScopedToken(self, request, context):
        if not request.scope or not 1 <= request.ttl_seconds <= MAX_SCOPED_TTL_SECONDS:
            raise InvalidArgument(f"a scoped token needs a scope and a ttl of 1-{MAX_SCOPED_TTL_SECONDS} s")
        token, expires = await self.credentials.issue_token(
            request.principal, request.scope, request.resource, request.ttl_seconds
        )
        response = auth_pb2.IssueScopedTokenResponse(token=token)
        response.expire_time.FromSeconds(expires)
        return response

    async def CheckScopedToken(self, request, context):
        principal, scope = await self.credentials.check_scoped(request.token, tuple(request.scopes), request.resource)
        return auth_pb2.CheckScopedTokenResponse(principal=principal, scope=scope)

    async def Authenticate(self, request, context):
        return auth_pb2.AuthenticateResponse(principal=await self.credentials.authenticate(request.credential))

    async def Authorize(self, request, context):
        return auth_pb2.AuthorizeResponse(allowed=permissions.allowed(request.principal.role, request.method))

    async def ReserveQuota(self, request, context):
        await self.quotas.reserve(request.tenant, request.reservation_id, request.amount)
        return auth_pb2.ReserveQuotaResponse()

    async def ReleaseQuota(self, request, context):
        await self.quotas.release(request.tenant, request.reservation_id)
        return auth_pb2.ReleaseQuotaResponse()

    async def RecordAuditEvent(self, request, context):
        return auth_pb2.RecordAuditEventResponse(event=await self.audit.append(request.event))

    async def ListAuditEvents(self, request, context):
        events, valid = await self.audit.list(request.tenant, request.start_time, request.end_time)
        return auth_pb2.ListAuditEventsResponse(events=events, chain_valid=valid)


async def token_sealer(context: ServiceContext[AuthSettings], records: Records) -> Sealer:
    """The key-encryption key of the signing keys; made here only for an installation that has no signing key yet
    (a second replica of a running one must be given the first one's file)."""
    path = (
        Path(context.settings.token_kek_file) if context.settings.token_kek_file else context.common.pki_path / KEK_FILE
    )
    if not path.exists() and not await records.list(SIGNING_KEYS) and create_kek(path):
        log.info("token_kek_created", path=str(path))
    return Sealer.load(path)


async def wire(server, context: ServiceContext[AuthSettings]) -> list[str]:
    records = Records(context.etcd)
    for kind in AUTH_KINDS:
        await records.migrate(kind)
    servicer = AuthServicer(context.etcd, context.settings, await token_sealer(context, records))
    CredentialMetrics(context.metrics).watch(servicer.credentials)
    QuotaMetrics(context.metrics, context.etcd)
    log.info("signing_keys_opened", count=await servicer.credentials.open_signing_keys())
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    context.on_shutdown.append(servicer.audit.drain)

    async def rotate() -> None:
        log.info("signing_key_rotated", kid=await servicer.credentials.rotate())

    context.every(context.settings.signing_key_rotation_seconds, rotate, "signing-key-rotation")
    return [auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name]
