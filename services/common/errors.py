"""One mapping between domain errors and gRPC statuses, used by every service.

Handlers raise `ServiceError` subclasses; `ErrorMappingInterceptor` turns them into a
google.rpc.Status with an ErrorInfo (domain `microvm.dev`, a stable UPPER_SNAKE reason). Errors from a
downstream service pass through unchanged, details included, so the caller sees the original cause.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.client_streams import BIDI_IDLE_SECONDS, refuse

DOMAIN = "microvm.dev"
log = structlog.get_logger()
# A status travels in the call's trailers twice (grpc-message percent-encoded, grpc-status-details-bin in base64),
# and clients refuse trailers beyond 8 KiB by default (the call then fails RESOURCE_EXHAUSTED, its status lost): what
# an error echoes of a request (a name, a path, a label) is cut to these bounds, in UTF-8 bytes.
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 256


def bounded(text: str, most: int) -> str:
    """`text`, or its first `most` bytes (whole characters) and how many more there were."""
    data = text.encode()
    if len(data) <= most:
        return text
    kept = data[:most].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes)"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        message = bounded(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: bounded(str(v), MAX_METADATA_VALUE_BYTES) for k, v in (metadata or {}).items()}

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata={k: str(v) for k, v in self.metadata.items()}
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return rpc_status.to_status(
            status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=[detail])
        )


def _error(name: str, code: grpc.StatusCode, reason: str) -> type[ServiceError]:
    return type(name, (ServiceError,), {"code": code, "default_reason": reason})


InvalidArgument = _error("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
NotFound = _error("NotFound", grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
AlreadyExists = _error("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
FailedPrecondition = _error("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
ResourceExhausted = _error("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED")
PermissionDenied = _error("PermissionDenied", grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
Unauthenticated = _error("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
Unavailable = _error("Unavailable", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
DeadlineExceeded = _error("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
DataLoss = _error("DataLoss", grpc.StatusCode.DATA_LOSS, "DATA_LOSS")
Internal = _error("Internal", grpc.StatusCode.INTERNAL, "INTERNAL")
Aborted = _error("Aborted", grpc.StatusCode.ABORTED, "ABORTED")
OutOfRange = _error("OutOfRange", grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE")


class Unimplemented(ServiceError):
    """A capability that is designed in the API but not built yet. Never a fake success."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "CAPABILITY_NOT_BUILT"

    def __init__(self, capability: str) -> None:
        super().__init__(f"{capability} is not built yet in this release", metadata={"capability": capability})


# google.rpc.Code number -> grpc.StatusCode, for errors reported by the guest agent.
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

ERROR_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        DataLoss,
        Internal,
        Aborted,
        OutOfRange,
    )
}


def error_from_code(code_number: int, message: str, reason: str | None = None) -> ServiceError:
    code = STATUS_BY_NUMBER.get(code_number, grpc.StatusCode.INTERNAL)
    return ERROR_BY_CODE.get(code, Internal)(message, reason=reason)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if the server sent one."""
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ServiceError):
        await context.abort_with_status(exc.to_status())
    if isinstance(exc, grpc.aio.AioRpcError):
        # Pass a downstream failure through with its details so the root cause stays visible.
        details = [(k, v) for k, v in (exc.trailing_metadata() or ()) if k == "grpc-status-details-bin"]
        if details:
            context.set_trailing_metadata(details)
        await context.abort(exc.code(), exc.details() or "")


class Malformed:
    """Stands for a request message that did not parse (bad wire format, invalid UTF-8 in a string)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def status(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid message: {self.error}", reason="MALFORMED_REQUEST")


def _tolerant(deserialize):
    """grpc answers a request it cannot parse with INTERNAL: parse here instead, and let the handler say why."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:
            return Malformed(exc)

    return parse


async def _checked(messages):
    async for message in messages:
        if isinstance(message, Malformed):
            raise message.status()
        yield message


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError (and downstream AioRpcError) raised by any handler into a proper status; a request that
    does not parse is INVALID_ARGUMENT; any other exception is a bug: logged with its traceback, answered INTERNAL
    without Python's text."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def inputs(request_or_iterator):
            if isinstance(request_or_iterator, Malformed):
                raise request_or_iterator.status()
            if hasattr(request_or_iterator, "__aiter__"):
                return _checked(request_or_iterator)
            return request_or_iterator

        async def fail(context, exc: BaseException) -> None:
            if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError):
                # etcd is down or restarting: the call may be retried, as when any other service is unreachable.
                exc = Unavailable(f"etcd is unreachable: {exc}", reason="ETCD_UNAVAILABLE")
            if isinstance(exc, ServiceError | grpc.aio.AioRpcError):
                _log(method, exc)
                await _abort(context, exc)
            incident = uuid.uuid4().hex[:12]
            log.exception("call_crashed", method=method, incident=incident)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}, in the service log)")

        def wrap_unary(behavior):
            async def wrapped(request_or_iterator: Any, context):
                requests = None
                try:
                    requests = inputs(request_or_iterator)
                    return await behavior(requests, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    if hasattr(requests, "__aiter__"):  # a client stream refused while its caller may still send
                        await refuse(context, requests)
                    await fail(context, exc)

            return wrapped

        def wrap_stream(behavior):
            async def wrapped(request_or_iterator: Any, context):
                requests = None
                try:
                    requests = inputs(request_or_iterator)
                    result = behavior(requests, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    if hasattr(requests, "__aiter__"):  # a bidirectional stream whose caller may still be sending
                        await refuse(context, requests, BIDI_IDLE_SECONDS)
                    await fail(context, exc)

            return wrapped

        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), deserialize, handler.response_serializer
        )


def _log(method: str, exc: BaseException) -> None:
    if isinstance(exc, ServiceError):
        log.info("call_failed", method=method, code=exc.code.name, reason=exc.reason, message=exc.message)
    else:
        log.info("call_failed_downstream", method=method, code=exc.code().name, message=exc.details())
