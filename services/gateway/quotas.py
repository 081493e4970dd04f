"""QuotaClient: a tenant's quota held in the auth service for what the gateway creates (a no-op without auth)."""

from __future__ import annotations

import grpc
import structlog

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.types.v1 import auth_pb2 as auth_types
from services.common import deadlines
from services.common.errors import ServiceError

log = structlog.get_logger()


class QuotaClient:
    def __init__(self, context) -> None:
        self.context = context
        self.enabled = context.settings.require_auth

    async def _on_auth(self, invoke):
        """On an auth replica; one that is gone is skipped for another (never reached: safe to repeat)."""
        return await self.context.on_newest(
            "auth", None, auth_pb2_grpc.AuthServiceStub, invoke, retry_for=deadlines.RESTART_WAIT
        )

    async def reserve(self, tenant: str, reservation_id: str, amount: auth_types.QuotaAmount) -> None:
        """Holds the tenant's quota for a new resource (atomic in the auth service; idempotent by id)."""
        if self.enabled:
            request = auth_pb2.ReserveQuotaRequest(tenant=tenant, reservation_id=reservation_id, amount=amount)
            await self._on_auth(lambda auth: auth.ReserveQuota(request, timeout=deadlines.CONTROL))

    async def release(self, tenant: str, reservation_id: str) -> None:
        if not self.enabled:
            return
        request = auth_pb2.ReleaseQuotaRequest(tenant=tenant, reservation_id=reservation_id)
        try:
            await self._on_auth(lambda auth: auth.ReleaseQuota(request, timeout=deadlines.CONTROL))
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            log.error("quota_release_failed", tenant=tenant, reservation=reservation_id, error=str(exc))
