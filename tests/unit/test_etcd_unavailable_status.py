"""A call that fails because etcd is down or restarting answers UNAVAILABLE (retryable), not INTERNAL (found by
the chaos suite, tests/standing: auth answered INTERNAL while etcd restarted)."""

from __future__ import annotations

import grpc
import pytest
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import ErrorMappingInterceptor, error_info


class EtcdDown(health_pb2_grpc.HealthServicer):
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def Check(self, request, context):
        raise self.error


@pytest.mark.parametrize("error", [ConnectionFailedError("Stream removed"), ConnectionTimeoutError("deadline")])
async def test_etcd_unreachable_is_unavailable(error):
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(EtcdDown(error), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(0)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(failure.value).reason == "ETCD_UNAVAILABLE"
