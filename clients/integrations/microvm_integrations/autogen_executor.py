"""Code executors for AutoGen that run a conversation's code blocks in a sandbox, keeping state between calls.

    executor = AsyncSandboxCodeExecutor(await AsyncSandbox.create())   # autogen_core's CodeExecutor (AutoGen 0.4+)
    agent = CodeExecutorAgent("runner", code_executor=executor)

    executor = SandboxCodeExecutor(Sandbox.create())                   # AutoGen 0.2 / AG2's synchronous protocol
    executor.execute_code_blocks([CodeBlock(code="x = 41", language="python")])

Each language runs in a code context of the executor's own (python, bash — `sh` and `shell` too — and whatever
else the sandbox has kernels for), so a variable set in one block is there in the next call; a language without a
kernel runs each block as a fresh process. Blocks run in order and stop at the first that fails; the result has
the last block's exit code (0 ok, 1 error, 124 timeout) and every block's output, as AutoGen's executors report.
`restart()` gives every context a fresh kernel. With `autogen_core` installed the async executor is its
`CodeExecutor` and returns its `CodeResult`; without it, the same shapes are defined here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from microvm_integrations.execution import CodeSession, Outcome, run_sync
from microvm_sandbox.errors import SandboxError

try:
    from autogen_core.code_executor import CodeBlock, CodeExecutor, CodeResult
except ImportError:  # AutoGen is optional: mirror its types

    @dataclass
    class CodeBlock:  # type: ignore[no-redef]
        """A code block extracted from an agent's message."""

        code: str
        language: str

    @dataclass
    class CodeResult:  # type: ignore[no-redef]
        """The result of executing code blocks."""

        exit_code: int
        output: str

    CodeExecutor = object  # type: ignore[assignment,misc]

__all__ = ["AsyncSandboxCodeExecutor", "CodeBlock", "CodeResult", "SandboxCodeExecutor"]


async def _execute(session: CodeSession, code_blocks: list[Any]) -> CodeResult:
    outputs, exit_code = [], 0
    for block in code_blocks:
        try:
            outcome = await session.run(block.code, block.language)
        except SandboxError as error:  # an unknown language, a missing interpreter, a gone sandbox
            outcome = Outcome(f"{error.message}\n", is_error=True, exit_code=1)
        outputs.append(outcome.text)
        exit_code = outcome.exit_code
        if exit_code != 0:
            break
    return CodeResult(exit_code=exit_code, output="".join(outputs))


class AsyncSandboxCodeExecutor(CodeExecutor):  # type: ignore[misc,valid-type]
    """autogen_core's `CodeExecutor` on an `AsyncSandbox`. `timeout`: seconds per block."""

    def __init__(self, sandbox: Any, *, timeout: float | None = 120.0, cwd: str | None = None) -> None:
        self.sandbox = sandbox
        self.session = CodeSession(sandbox, timeout=timeout, cwd=cwd)

    async def execute_code_blocks(self, code_blocks: list[Any], cancellation_token: Any = None) -> CodeResult:
        """Runs the blocks in order (see the module). Cancelling the token cancels the run, which interrupts it."""
        task = asyncio.ensure_future(_execute(self.session, code_blocks))
        if cancellation_token is not None:
            cancellation_token.link_future(task)
        return await task

    async def start(self) -> None:
        """Nothing to start: contexts are made by the first block of their language."""

    async def stop(self) -> None:
        """Deletes the executor's contexts; the sandbox stays (its owner kills it)."""
        await self.session.close()

    async def restart(self) -> None:
        """Fresh kernels for every context: variables and imports are gone."""
        await self.session.restart()

    async def __aenter__(self) -> AsyncSandboxCodeExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SandboxCodeExecutor:
    """The synchronous executor protocol of AutoGen 0.2 and AG2 (`execute_code_blocks(blocks)`, `restart()`,
    `code_extractor`) on a sync `Sandbox`. `timeout`: seconds per block."""

    def __init__(self, sandbox: Any, *, timeout: float | None = 120.0, cwd: str | None = None) -> None:
        self.sandbox = sandbox
        self.session = CodeSession(sandbox, timeout=timeout, cwd=cwd)

    @property
    def code_extractor(self) -> Any:
        """AutoGen's markdown code-block extractor (needs `autogen` or `ag2` installed)."""
        from autogen.coding import MarkdownCodeExtractor  # type: ignore[import-not-found]

        return MarkdownCodeExtractor()

    def execute_code_blocks(self, code_blocks: list[Any]) -> CodeResult:
        return run_sync(_execute(self.session, code_blocks))

    def restart(self) -> None:
        """Fresh kernels for every context: variables and imports are gone."""
        run_sync(self.session.restart())

    def close(self) -> None:
        """Deletes the executor's contexts; the sandbox stays."""
        run_sync(self.session.close())
