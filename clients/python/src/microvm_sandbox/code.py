"""Stateful code execution (the CodeService): `run_code` runs code in a Jupyter kernel in the sandbox, whose state
persists between calls, and returns an `Execution` with rich results (microvm_sandbox.code_models). Code contexts
are kernels of their own: create, list, restart, delete, interrupt. These are methods of `AsyncSandbox` (the sync
twins are in microvm_sandbox.code_sync).

    async with AsyncSandbox.create("code-interpreter") as sb:
        await sb.run_code("x = 41")
        print((await sb.run_code("x + 1")).text)                  # 42
        plot = await sb.run_code("import matplotlib.pyplot as plt; plt.plot([1, 2, 3]); plt.show()")
        plot.results[0].save("plot.png"); print(plot.results[0].chart["type"])  # line

A sandbox whose template has no code server raises CodeInterpreterMissing; a context that does not exist
CodeContextNotFound; an unknown language InvalidArgumentError (reason UNKNOWN_LANGUAGE, naming those installed).
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import code_service_pb2 as code_api
from microvm_sandbox.code_models import (
    CodeContext,
    Execution,
    ExecutionBuilder,
    ExecutionError,
    Result,
    context_id,
)
from microvm_sandbox.errors import SandboxError, from_rpc_error

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient

DEFAULT_RUN_TIMEOUT = 300.0  # the server's default: how long code may run before it is interrupted
STREAM_GRACE = 60.0  # the call's deadline beyond the run's own timeout: the server ends the run first
StdoutCallback = Callable[[str], object]
ResultCallback = Callable[[Result], object]
ErrorCallback = Callable[[ExecutionError], object]


def run_code_request(
    sandbox: str,
    code: str,
    language: str | None,
    context: CodeContext | str | None,
    timeout: float | None,
    envs: dict[str, str] | None,
) -> code_api.RunCodeRequest:
    """The RunCode request. Without a language the server picks: the context's, else python."""
    request = code_api.RunCodeRequest(
        sandbox=sandbox, code=code, language=language or "", context=context_id(context), env=envs or {}
    )
    if timeout:
        request.timeout.FromNanoseconds(int(timeout * 1e9))
    return request


class CodeRunStream:
    """The raw events (RunCodeResponse) of one run, for `async for`; errors are SDK exceptions. `cancel()` (or
    leaving early) cancels the call, which interrupts the kernel (the context keeps its state)."""

    def __init__(self, client: AsyncClient, request: code_api.RunCodeRequest, timeout: float | None) -> None:
        deadline = (timeout or DEFAULT_RUN_TIMEOUT) + STREAM_GRACE
        self._call = client.code_stub.RunCode(request, metadata=client.metadata, timeout=deadline)
        self._responses = self._call.__aiter__()

    def __aiter__(self) -> CodeRunStream:
        return self

    async def __anext__(self) -> code_api.RunCodeResponse:
        try:
            response: code_api.RunCodeResponse = await self._responses.__anext__()
            return response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    def cancel(self) -> None:
        """Stops the run (the kernel is interrupted). Safe to call twice."""
        if not self._call.done():
            self._call.cancel()


def unfinished() -> SandboxError:
    return SandboxError("the code run's stream ended without its end event", code="UNAVAILABLE")


async def _deliver(callback: Callable[[Any], object] | None, value: Any) -> None:
    if callback is not None:
        outcome = callback(value)
        if inspect.isawaitable(outcome):
            await outcome


class AsyncCodeMethods:
    """`AsyncSandbox`'s code methods: run_code and the code contexts (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        *,
        context: CodeContext | str | None = None,
        on_stdout: StdoutCallback | None = None,
        on_stderr: StdoutCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
    ) -> Execution:
        """Runs `code` in a kernel whose state persists between calls and returns its Execution (results, logs,
        error, execution_count, status). language: `python` (when neither it nor a context is given), or another
        the template has a kernel for (`list_code_languages()`); each language has a default context. context: a
        CodeContext or its id (`create_code_context`); its own language then. on_stdout/on_stderr (str),
        on_result (Result), on_error (ExecutionError): called as events arrive (plain or async functions).
        timeout: seconds before the kernel is interrupted (default 300): status "timeout", the state is kept.
        envs: environment variables for this run only. An exception in the code is not raised: it is
        `Execution.error` (status "error"). Cancelling the call interrupts the kernel."""
        request = run_code_request(self.name, code, language, context, timeout, envs)
        callbacks: dict[str, Callable[[Any], object] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        builder = ExecutionBuilder()
        stream = CodeRunStream(self.client, request, timeout)
        try:
            async for response in stream:
                event = builder.add(response)
                if event is not None:
                    await _deliver(callbacks[event[0]], event[1])
                if builder.ended:
                    return builder.execution
        finally:
            stream.cancel()
        raise unfinished()

    async def _code_call(self, method: str, request: Any, *, idempotent: bool = False) -> Any:
        return await self.client.call(method, request, idempotent=idempotent, stub=self.client.code_stub)

    async def create_code_context(
        self, language: str = "python", cwd: str | None = None, envs: dict[str, str] | None = None
    ) -> CodeContext:
        """A new code context: a kernel of its own for `language`, in `cwd` (default: the template's working
        directory), with `envs`. Its state is its own: other contexts never see its variables."""
        request = code_api.CreateCodeContextRequest(sandbox=self.name, language=language, cwd=cwd or "", env=envs or {})
        return CodeContext.from_message((await self._code_call("CreateCodeContext", request)).context)

    async def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The sandbox's code contexts, the default ones included once started."""
        request = code_api.ListCodeContextsRequest(sandbox=self.name)
        reply = await self._code_call("ListCodeContexts", request, idempotent=True)
        return [CodeContext.from_message(context) for context in reply.contexts]

    async def list_code_languages(self) -> builtins.list[str]:
        """The languages the sandbox has kernels for (what `run_code` and `create_code_context` take)."""
        request = code_api.ListCodeContextsRequest(sandbox=self.name)
        return list((await self._code_call("ListCodeContexts", request, idempotent=True)).languages)

    async def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        """Replaces the context's kernel with a fresh one (same language, cwd and envs): its state is lost."""
        request = code_api.RestartCodeContextRequest(sandbox=self.name, context=context_id(context))
        return CodeContext.from_message((await self._code_call("RestartCodeContext", request)).context)

    async def delete_code_context(self, context: CodeContext | str) -> None:
        """Deletes the context and stops its kernel. CodeContextNotFound when it does not exist."""
        request = code_api.DeleteCodeContextRequest(sandbox=self.name, context=context_id(context))
        await self._code_call("DeleteCodeContext", request)

    async def interrupt_code(self, context: CodeContext | str) -> None:
        """Interrupts the code running in the context (its run ends with status "error"); the state is kept."""
        request = code_api.InterruptCodeRequest(sandbox=self.name, context=context_id(context))
        await self._code_call("InterruptCode", request)


__all__ = ["AsyncCodeMethods", "CodeRunStream", "run_code_request"]
