"""The gRPC channel `mvm` uses where the SDK has no method (terminal sessions, the admin API): the API key as a
bearer token on every call."""

from __future__ import annotations

import grpc


class BearerAuth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str) -> None:
        self.metadata = ("authorization", f"Bearer {key}")

    def _with_auth(self, details):
        metadata = list(details.metadata or []) + [self.metadata]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _Details(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            )
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_auth(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_auth(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def connect(gateway: str, key: str) -> grpc.Channel:
    channel = grpc.insecure_channel(
        gateway, options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    )
    return grpc.intercept_channel(channel, BearerAuth(key))
