"""GuestCode: CodeService on a guest, over a tunnel to its code server's unix socket (/run/mvm-code.sock).

Each call is one connection: the request as one JSON line, the answer as JSON lines (a run streams its events up to
`end`). A run whose caller goes away (cancelled, deadline) is interrupted through a second connection, so the
kernel stops the cell and keeps its state. A quiet run sends a keepalive every KEEPALIVE_SECONDS.
"""

from __future__ import annotations

import asyncio
import re

from microvm.sandbox.v1 import code_service_pb2 as api
from services.common.errors import InvalidArgument, ServiceError
from services.common.validation import check_env, check_path
from services.relay.code_events import context_of, refusal, responses_of
from services.relay.guest_server import GuestServer

CODE_SOCKET = "/run/mvm-code.sock"
KEEPALIVE_SECONDS = 10.0
MAX_CODE_BYTES = 1 << 20
MAX_ENV = 256
DEFAULT_TIMEOUT_SECONDS = 300.0
MAX_TIMEOUT_SECONDS = 24 * 3600.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def _name(value: str, field: str) -> str:
    if value and not NAME.fullmatch(value):
        raise InvalidArgument(
            f"{field} must be 1-64 letters, digits, '_', '.', '+' or '-', got {value[:80]!r}", reason="INVALID_REQUEST"
        )
    return value


def default_context(language: str) -> str:
    """The code server's name for a language's default context."""
    return "default" if language in ("", "python") else f"default-{language}"


def run_request(request: api.RunCodeRequest) -> dict:
    """The code server's run request, after checking every field's bounds."""
    if len(request.code.encode()) > MAX_CODE_BYTES:
        raise InvalidArgument(f"code is longer than {MAX_CODE_BYTES} bytes", reason="INVALID_REQUEST")
    if "\x00" in request.code:
        raise InvalidArgument("code contains a NUL byte", reason="INVALID_REQUEST")
    timeout = request.timeout.seconds + request.timeout.nanos / 1e9 if request.HasField("timeout") else 0.0
    if timeout < 0 or timeout > MAX_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"timeout must be 0 (the default, {DEFAULT_TIMEOUT_SECONDS:g} s) to {MAX_TIMEOUT_SECONDS:g} s",
            reason="INVALID_REQUEST",
        )
    if len(request.env) > MAX_ENV:
        raise InvalidArgument(f"env has more than {MAX_ENV} entries", reason="INVALID_REQUEST")
    check_env(request.env, "env")
    message: dict = {"op": "run", "code": request.code, "timeout": timeout or DEFAULT_TIMEOUT_SECONDS}
    if _name(request.context, "context"):
        message["context"] = request.context
    if _name(request.language, "language"):
        message["language"] = request.language
    if request.env:
        message["env"] = dict(request.env)
    return message


class GuestCode:
    def __init__(self, open_stream) -> None:
        self.server = GuestServer(
            open_stream,
            CODE_SOCKET,
            "code server",
            "code interpreter: create the sandbox from the `code-interpreter` template or one built on it, or use "
            "Exec for one-off scripts",
            "CODE_INTERPRETER_MISSING",
            "CODE_SERVER_FAILED",
            refusal,
        )
        self.call = self.server.call

    async def run(self, request: api.RunCodeRequest):
        message = run_request(request)
        context = request.context or default_context(request.language)
        ended, tunnel = False, None
        try:
            first = asyncio.ensure_future(self.server.send_first(request.sandbox, message))
            while not first.done():
                done, _ = await asyncio.wait([first], timeout=KEEPALIVE_SECONDS)
                if not done:
                    yield api.RunCodeResponse(keepalive={})
            tunnel, event = first.result()
            while True:
                for response in responses_of(event, context):
                    ended = response.HasField("end")
                    yield response
                if ended:
                    return
                while True:
                    try:
                        async with asyncio.timeout(KEEPALIVE_SECONDS):
                            event = await self.server.answer(tunnel)
                        break
                    except TimeoutError:
                        yield api.RunCodeResponse(keepalive={})
        finally:
            if not first.done():
                first.cancel()
            if tunnel is not None and ended:
                await self.server.release(request.sandbox, tunnel)  # a whole run: the next one may use it
            elif tunnel is not None:
                await tunnel.close()
            if not ended:
                await self._interrupt_quietly(request.sandbox, context)

    async def _interrupt_quietly(self, sandbox: str, context: str) -> None:
        """The caller left mid-run: stop the cell (the context keeps its state). Best effort: the guest may be gone."""
        try:
            await asyncio.wait_for(self.call(sandbox, {"op": "interrupt", "context": context}, "interrupted"), 10)
        except (ServiceError, TimeoutError, OSError):
            pass

    async def create_context(self, request: api.CreateCodeContextRequest) -> api.CreateCodeContextResponse:
        if len(request.env) > MAX_ENV:
            raise InvalidArgument(f"env has more than {MAX_ENV} entries", reason="INVALID_REQUEST")
        check_env(request.env, "env")
        message: dict = {"op": "create_context", "language": _name(request.language, "language") or "python"}
        if request.cwd:
            message["cwd"] = check_path(request.cwd, "cwd")
        if request.env:
            message["env"] = dict(request.env)
        answer = await self.call(request.sandbox, message, "context")
        return api.CreateCodeContextResponse(context=context_of(answer.get("context") or {}))

    async def list_contexts(self, request: api.ListCodeContextsRequest) -> api.ListCodeContextsResponse:
        answer = await self.call(request.sandbox, {"op": "list_contexts"}, "contexts")
        return api.ListCodeContextsResponse(
            contexts=[context_of(c) for c in answer.get("contexts") or [] if isinstance(c, dict)],
            languages=[str(language) for language in answer.get("languages") or []],
        )

    async def _on_context(self, request, op: str, expect: str) -> dict:
        if not request.context:
            raise InvalidArgument("context is required", reason="INVALID_REQUEST")
        return await self.call(request.sandbox, {"op": op, "context": _name(request.context, "context")}, expect)

    async def restart_context(self, request: api.RestartCodeContextRequest) -> api.RestartCodeContextResponse:
        answer = await self._on_context(request, "restart_context", "context")
        return api.RestartCodeContextResponse(context=context_of(answer.get("context") or {}))

    async def delete_context(self, request: api.DeleteCodeContextRequest) -> api.DeleteCodeContextResponse:
        await self._on_context(request, "delete_context", "deleted")
        return api.DeleteCodeContextResponse()

    async def interrupt(self, request: api.InterruptCodeRequest) -> api.InterruptCodeResponse:
        await self._on_context(request, "interrupt", "interrupted")
        return api.InterruptCodeResponse()
