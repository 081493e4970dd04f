"""`Sandbox`'s code methods for synchronous code: the twins of `AsyncCodeMethods` (microvm_sandbox.code), run on the
sync SDK's loop. Callbacks run in the calling thread, as each event arrives."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from microvm_sandbox.code import (
    CodeRunStream,
    ErrorCallback,
    ResultCallback,
    StdoutCallback,
    run_code_request,
    unfinished,
)
from microvm_sandbox.code_models import CodeContext, Execution, ExecutionBuilder

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.sync_loop import Loop


class CodeMethods:
    """`Sandbox`'s code methods: run_code and the code contexts (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    def run_code(
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
        """Runs `code` in a kernel whose state persists between calls and returns its Execution (see
        `AsyncSandbox.run_code`). The callbacks are called in this thread as events arrive."""
        request = run_code_request(self.aio.name, code, language, context, timeout, envs)
        callbacks: dict[str, Callable[[Any], object] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        builder = ExecutionBuilder()

        async def open_stream() -> CodeRunStream:
            return CodeRunStream(self.aio.client, request, timeout)  # the call belongs to the loop's thread

        stream = self._loop.run(open_stream())
        try:
            while True:
                try:
                    response = self._loop.run(stream.__anext__())
                except StopAsyncIteration:
                    raise unfinished() from None
                event = builder.add(response)
                if event is not None and callbacks[event[0]] is not None:
                    callbacks[event[0]](event[1])  # type: ignore[misc]
                if builder.ended:
                    return builder.execution
        finally:
            self._loop.soon(_cancel(stream))

    def create_code_context(
        self, language: str = "python", cwd: str | None = None, envs: dict[str, str] | None = None
    ) -> CodeContext:
        """A new code context: a kernel of its own for `language`, in `cwd`, with `envs`."""
        return self._loop.run(self.aio.create_code_context(language, cwd, envs))

    def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The sandbox's code contexts, the default ones included once started."""
        return self._loop.run(self.aio.list_code_contexts())

    def list_code_languages(self) -> builtins.list[str]:
        """The languages the sandbox has kernels for."""
        return self._loop.run(self.aio.list_code_languages())

    def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        """Replaces the context's kernel with a fresh one: its state is lost."""
        return self._loop.run(self.aio.restart_code_context(context))

    def delete_code_context(self, context: CodeContext | str) -> None:
        """Deletes the context and stops its kernel. CodeContextNotFound when it does not exist."""
        self._loop.run(self.aio.delete_code_context(context))

    def interrupt_code(self, context: CodeContext | str) -> None:
        """Interrupts the code running in the context; the state is kept."""
        self._loop.run(self.aio.interrupt_code(context))


async def _cancel(stream: CodeRunStream) -> None:
    stream.cancel()


__all__ = ["CodeMethods"]
