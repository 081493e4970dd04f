"""Access control at the public door: who is calling, may they, how fast, and the audit trail.

Every SandboxService call must carry `authorization: Bearer <API key or token>`; the auth service checks the
credential and the permission matrix. The caller's principal is then available to handlers
(`current_principal()`), which scope every resource to its tenant: another tenant's sandbox or snapshot is
NOT_FOUND, never PERMISSION_DENIED, so nothing leaks about its existence. Each API key has a token bucket;
every mutating call is recorded in the tenant's audit log with its result, and its result is returned only once auth
has stored that entry (`AccessInterceptor.audit`). A call refused at the door (no or bad credential, forbidden,
rate limited) never ran and is not recorded.

An E2B per-sandbox access token (services/gateway/e2b/access_token.py) is admitted too, confined: only for the
in-sandbox methods and only on its own sandbox (any other target is NOT_FOUND, as a missing sandbox is).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.types.v1 import auth_pb2 as auth_types
from services.auth import permissions
from services.auth.permissions import MUTATING
from services.common import deadlines, observability
from services.common.client_streams import BIDI_IDLE_SECONDS, refuse
from services.common.errors import DOMAIN, NotFound, PermissionDenied, ServiceError, Unauthenticated, Unavailable
from services.gateway.e2b import access_token

log = structlog.get_logger()
_principal: contextvars.ContextVar[auth_pb2.Principal | None] = contextvars.ContextVar("principal", default=None)
PUBLIC_PREFIXES = (
    permissions.SANDBOX,
    permissions.NODES,
    permissions.TEMPLATES,
    permissions.CODE,
    permissions.PORTS,
    permissions.DESKTOP,
    permissions.METRICS,
    permissions.EVENTS,
    permissions.WEBHOOKS,
)


def current_principal() -> auth_pb2.Principal | None:
    return _principal.get()


def current_tenant() -> str | None:
    principal = _principal.get()
    return principal.tenant if principal else None


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def rate_limited(wait: float) -> grpc.Status:
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(wait), nanos=int((wait % 1) * 1e9))
    )
    info = error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain=DOMAIN)
    details = []
    for message in (info, retry):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED, message=f"rate limit exceeded; retry in {wait:.2f}s", details=details
        )
    )


def target_of(request) -> str:
    for field in ("name", "sandbox", "snapshot", "template", "parent"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value
    for field in ("sandbox", "template", "webhook"):
        inner = getattr(request, field, None)
        if inner is not None and not isinstance(inner, str) and getattr(inner, "name", ""):
            return inner.name
    return ""


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, context, rate_per_second: float, burst: float, operator_tenants=("default",), local_keys=None
    ) -> None:
        self.context = context
        self.local_keys = local_keys  # LocalApiKeys: a valid API key without asking auth
        self.sandbox_tokens = access_token.VerifiedTokens(local_keys)  # E2B access tokens auth has verified
        self.operator_tenants = frozenset(operator_tenants)
        self.rate, self.burst = rate_per_second, burst
        self.buckets: dict[str, TokenBucket] = {}
        self._pending: set[asyncio.Task] = set()

    async def _on_auth(self, invoke):
        """`invoke(stub)` on an auth replica; one that is gone is skipped for another (never reached: safe)."""
        return await self.context.on_newest(
            "auth", None, auth_pb2_grpc.AuthServiceStub, invoke, retry_for=deadlines.RESTART_WAIT
        )

    async def _admit(self, method: str, metadata) -> tuple[auth_pb2.Principal, str]:
        """The caller, and the one sandbox id its credential is confined to ("" for an API key or token)."""
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthenticated("send `authorization: Bearer <API key or token>`", reason="NO_CREDENTIAL")
        credential = credential.strip()
        principal = self.local_keys.principal(credential) if self.local_keys is not None else None
        if principal is None and (sandbox := access_token.sandbox_scope(credential)) is not None:
            return await self._admit_sandbox_token(method, credential, sandbox), sandbox
        if principal is None:  # not one this gateway can vouch for: auth decides (and counts, and says why not)
            request = auth_pb2.AuthenticateRequest(credential=credential)
            principal = (
                await self._on_auth(lambda auth: auth.Authenticate(request, timeout=deadlines.QUICK))
            ).principal
        # The permission matrix is the auth service's own module: checking it here saves a round trip
        # on every call, and both sides always agree.
        if method in permissions.NODE_ADMIN and principal.tenant not in self.operator_tenants:
            raise PermissionDenied(
                "node administration is for the cluster's operators (gateway.operator_tenants)",
                reason="NOT_AN_OPERATOR",
            )
        if not permissions.allowed(principal.role, method):
            raise PermissionDenied(
                f"role {auth_types.Role.Name(principal.role)} may not call {method.rsplit('/', 1)[1]}",
                reason="ROLE_FORBIDS",
            )
        return principal, ""

    async def _admit_sandbox_token(self, method: str, token: str, sandbox: str) -> auth_pb2.Principal:
        """The principal of an E2B access token for `sandbox`, from the cache or auth (which checks its signature,
        expiry, scope and resource, and the API key behind it)."""
        if method not in access_token.IN_SANDBOX_METHODS:
            raise PermissionDenied(
                f"a sandbox access token may not call {method.rsplit('/', 1)[1]}", reason="ROLE_FORBIDS"
            )
        verified = self.sandbox_tokens.get(token)
        if verified is None:
            check = auth_pb2.CheckScopedTokenRequest(token=token, scopes=[access_token.SCOPE], resource=sandbox)
            checked = await self._on_auth(lambda auth: auth.CheckScopedToken(check, timeout=deadlines.QUICK))
            self.sandbox_tokens.put(token, checked.principal, sandbox)
            verified = checked.principal, sandbox
        principal = verified[0]
        if not permissions.allowed(principal.role, method):
            raise PermissionDenied(
                f"role {auth_types.Role.Name(principal.role)} may not call {method.rsplit('/', 1)[1]}",
                reason="ROLE_FORBIDS",
            )
        return principal

    # Auditing a call, and what a failure to record means for a call whose effect already happened.
    #
    # The entry is written after the call ran, with its result, and the result is returned only once auth has
    # stored the entry (auth answers when the entry's etcd transaction committed). When it cannot be stored, a call
    # that succeeded fails UNAVAILABLE (AUDIT_UNAVAILABLE): its caller is never told "done" about something the
    # tenant's log does not show. Its effect may stand all the same (the sandbox was changed, the file written):
    # the status says so, and the caller treats it as any call whose answer was lost, checking before retrying;
    # the gateway's log has the unrecorded call (`audit_record_failed`: principal, method, target, result). We chose
    # this over an "attempt" entry before the effect and a result entry after it: one entry per call keeps the log
    # what it claims to be (what was done, by whom, with what result), and a pre-recorded attempt whose result entry
    # failed would leave the same question open. A call that failed still gets its entry before its status is
    # returned; when that entry cannot be stored the caller gets the call's own error (it failed either way).
    # A caller that hangs up never cancels its own entry: it is written by a task of its own (shielded, owned here,
    # waited for at shutdown). A stream follows the same rule at its end: its final status waits for its entry.

    async def audit(
        self, principal, method: str, target: str, code: grpc.StatusCode, *, caller_gone: bool = False
    ) -> None:
        """Records a mutating call in its tenant's audit log; returns once auth has stored the entry, raises
        Unavailable (AUDIT_UNAVAILABLE) when it could not. `caller_gone`: nobody waits; written in the background."""
        task = self.start_audit(principal, method, target, code)
        if task is not None and not caller_gone:
            await asyncio.shield(task)

    def start_audit(self, principal, method: str, target: str, code: grpc.StatusCode) -> asyncio.Task | None:
        """Starts writing the entry (for `audit`, or a stream whose result is settled before its end): a task of
        its own, which nothing but the shutdown cancels; None for a call that is not audited."""
        if method not in MUTATING:
            return None
        task = asyncio.get_running_loop().create_task(self._record(principal, method, target, code))
        self._pending.add(task)
        task.add_done_callback(self._recorded)
        return task

    def _recorded(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, for an entry nobody waited for: `_record` logged its failure

    async def _record(self, principal, method: str, target: str, code: grpc.StatusCode) -> None:
        request = auth_pb2.RecordAuditEventRequest(
            event=auth_types.AuditEvent(
                tenant=principal.tenant, principal=principal.id, method=method, target=target, result=code.name
            )
        )
        try:
            await self._on_auth(lambda auth: auth.RecordAuditEvent(request, timeout=deadlines.QUICK))
        except Exception as exc:
            cause = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else exc.message
                if isinstance(exc, ServiceError)
                else repr(exc)
            )
            log.error(
                "audit_record_failed",
                tenant=principal.tenant,
                principal=principal.id,
                method=method,
                target=target,
                result=code.name,
                error=cause,
            )
            raise Unavailable(
                f"the call's audit entry could not be recorded ({cause}); the call may have taken effect: "
                "check before retrying",
                reason="AUDIT_UNAVAILABLE",
                metadata={"method": method.rsplit("/", 1)[1], "result": code.name},
            ) from None

    async def drain(self) -> None:
        """At shutdown: lets the entries still being written for callers that hung up finish (bounded by the
        shutdown step, which cancels them)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PUBLIC_PREFIXES):
            return handler
        interceptor = self

        async def admit(context, requests=None) -> tuple[auth_pb2.Principal, str]:
            async def refuse_stream() -> None:
                # A bidirectional stream (`requests`) is refused first: a caller still sending (a BuildTemplate
                # context) then gets this status, not INTERNAL (services/common/client_streams.py).
                if requests is not None:
                    await refuse(context, requests, BIDI_IDLE_SECONDS)

            try:
                principal, confined = await interceptor._admit(method, context.invocation_metadata())
            except ServiceError as exc:
                await refuse_stream()
                await context.abort_with_status(exc.to_status())
            except grpc.aio.AioRpcError as exc:
                await refuse_stream()
                await context.abort(exc.code(), exc.details() or "")
            bucket = interceptor.buckets.setdefault(principal.key_id, TokenBucket(interceptor.rate, interceptor.burst))
            if (wait := bucket.take()) > 0:
                await refuse_stream()
                await context.abort_with_status(rate_limited(wait))
            _principal.set(principal)
            observability.bind_to_call(tenant=principal.tenant)  # on every later log line of this call
            return principal, confined

        def is_exit(item) -> bool:
            return hasattr(item, "HasField") and "exited" in item.DESCRIPTOR.fields_by_name and item.HasField("exited")

        def outside(confined: str, target: str) -> bool:
            """Whether a call confined to one sandbox (an E2B access token) names another, or none."""
            return bool(confined) and access_token.sandbox_of_target(target) != confined

        def not_found() -> NotFound:
            return NotFound("sandbox not found", reason="SANDBOX_NOT_FOUND")

        def result_code(context, exc: BaseException | None) -> grpc.StatusCode:
            if isinstance(exc, ServiceError):
                return exc.code
            if isinstance(exc, grpc.aio.AioRpcError):
                return exc.code()
            if exc is not None:
                return grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
            code = context.code()
            return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK

        class FirstMessage:
            """Wraps a request stream to learn the target from its first message."""

            def __init__(self, iterator, confined: str = "") -> None:
                self.iterator, self.target, self.confined = iterator, "", confined

            def __aiter__(self):
                return self._iterate()

            async def _iterate(self):
                async for message in self.iterator:
                    if not self.target:
                        oneofs = message.DESCRIPTOR.oneofs
                        part = message.WhichOneof(oneofs[0].name) if oneofs else None
                        inner = getattr(message, part or "", None)
                        self.target = target_of(inner) if inner is not None else ""
                        if outside(self.confined, self.target):
                            raise not_found()
                    yield message

        def target_of_call(request, response=None) -> str:
            # A create's target is what it created: the name is in the response.
            target = request.target if isinstance(request, FirstMessage) else target_of(request)
            return target or (target_of(response) if response is not None else "")

        async def audit_failure(principal, target: str, code: grpc.StatusCode, exc: BaseException) -> None:
            """A failed (or hung-up) call's entry; the caller gets the call's own error even if this fails."""
            gone = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            try:
                await interceptor.audit(principal, method, target, code, caller_gone=gone)
            except ServiceError:
                pass  # logged by `_record`

        def unary(behavior, streaming_request: bool):
            async def wrapped(request, context):
                principal, confined = await admit(context)
                if not streaming_request and outside(confined, target_of(request)):
                    await context.abort_with_status(not_found().to_status())
                request = FirstMessage(request, confined) if streaming_request else request
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    await audit_failure(principal, target_of_call(request), result_code(context, exc), exc)
                    raise
                # Returned only once its entry is stored; else the call fails AUDIT_UNAVAILABLE.
                await interceptor.audit(
                    principal, method, target_of_call(request, response), result_code(context, None)
                )
                return response

            return wrapped

        def streaming(behavior, streaming_request: bool):
            async def wrapped(request, context):
                principal, confined = await admit(context, request if streaming_request else None)
                if not streaming_request and outside(confined, target_of(request)):
                    await context.abort_with_status(not_found().to_status())
                request = FirstMessage(request, confined) if streaming_request else request
                # A process stream is complete once its exit was delivered, even if the caller hangs up right
                # after reading it: its entry is started with the exit, written while the exit travels.
                settled: asyncio.Task | None = None
                try:
                    async for item in behavior(request, context):
                        if settled is None and is_exit(item):
                            code = result_code(context, None)
                            settled = interceptor.start_audit(principal, method, target_of_call(request), code)
                        yield item
                except BaseException as exc:
                    if settled is None:
                        await audit_failure(principal, target_of_call(request), result_code(context, exc), exc)
                    elif not isinstance(exc, asyncio.CancelledError | GeneratorExit):
                        with contextlib.suppress(ServiceError):  # the caller gets the stream's own error
                            await asyncio.shield(settled)
                    raise
                # The stream's final status waits for its entry, as a unary call's answer does.
                if settled is not None:
                    await asyncio.shield(settled)
                else:
                    await interceptor.audit(principal, method, target_of_call(request), result_code(context, None))

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                unary(handler.stream_unary, True), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream, False), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer
        )
