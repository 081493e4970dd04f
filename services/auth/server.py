"""Wiring of the auth service. Keys, tokens, roles, quotas and audit come in the auth issue; until
then every RPC answers UNIMPLEMENTED naming the capability."""

from __future__ import annotations

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.errors import Unimplemented
from services.common.server import ServiceContext
from services.common.settings import AuthSettings

_KEYS = "API keys and tokens"


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    async def CreateTenant(self, request, context):
        raise Unimplemented("tenants")

    async def CreateApiKey(self, request, context):
        raise Unimplemented(_KEYS)

    async def RevokeApiKey(self, request, context):
        raise Unimplemented(_KEYS)

    async def ExchangeApiKey(self, request, context):
        raise Unimplemented(_KEYS)

    async def Authenticate(self, request, context):
        raise Unimplemented(_KEYS)

    async def Authorize(self, request, context):
        raise Unimplemented("roles and permissions")

    async def ReserveQuota(self, request, context):
        raise Unimplemented("tenant quotas")

    async def ReleaseQuota(self, request, context):
        raise Unimplemented("tenant quotas")

    async def RecordAuditEvent(self, request, context):
        raise Unimplemented("audit log")

    async def ListAuditEvents(self, request, context):
        raise Unimplemented("audit log")


async def wire(server, context: ServiceContext[AuthSettings]) -> list[str]:
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(), server)
    return [auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name]
