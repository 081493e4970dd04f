"""A LangChain tool that runs code in a MicroVM sandbox (optional extra: langchain-core).

tool = SandboxCodeTool(sandbox=Sandbox.create())
tool.invoke({"language": "python", "code": "print(6*7)"})
"""

from __future__ import annotations

from typing import Any

from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field

from microvm_sandbox import CommandNotFound, InvalidArgumentError, Sandbox, SandboxError


class CodeInput(BaseModel):
    language: str = Field(description="`python`, `bash`, `sh`, `javascript`, `ruby` or `perl`")
    code: str = Field(description="the program to run; its stdout and stderr are returned")


class SandboxCodeTool(BaseTool):
    """Executes code in an isolated microVM and returns exit code and output."""

    name: str = "microvm_execute_code"
    description: str = (
        "Run Python, bash/sh, JavaScript, Ruby or Perl code in an isolated Linux sandbox (the default template has "
        "python3, bash and sh). Files persist between calls. Returns the exit code, stdout and stderr."
    )
    args_schema: type[BaseModel] = CodeInput
    sandbox: Any = None
    timeout_seconds: int = 120
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _run(self, language: str, code: str, **_: Any) -> str:
        """The tool's answer: exit code, stdout and stderr as text, or the error."""
        try:
            result = self.sandbox.run_code(language, code, timeout=self.timeout_seconds)
        except SandboxError as error:
            return f"error: {error.code}: {error.message}"
        return (
            f"exit code: {result.exit_code if result.signal is None else 'signal ' + str(result.signal)}\n"
            f"stdout:\n{result.stdout.decode(errors='replace')}\nstderr:\n{result.stderr.decode(errors='replace')}"
        )


class SandboxCodeExecutor:
    """A code executor in the shape AutoGen's `CodeExecutor` protocol uses: `execute_code_blocks(blocks)`
    where each block has `.language` and `.code`, returning an object with `exit_code` and `output`. Blocks run in
    order and stop at the first that fails; an unknown language, or one whose interpreter the sandbox lacks, is a
    failed block (exit code 1, the reason as output), as AutoGen's own executors report it."""

    def __init__(self, sandbox: Sandbox, timeout_seconds: int = 120) -> None:
        self.sandbox = sandbox
        self.timeout_seconds = timeout_seconds

    def execute_code_blocks(self, code_blocks: list[Any]) -> CodeResult:
        outputs, exit_code = [], 0
        for block in code_blocks:
            try:
                result = self.sandbox.run_code(block.language, block.code, timeout=self.timeout_seconds)
            except (InvalidArgumentError, CommandNotFound) as error:  # an unknown or uninstalled language
                outputs.append(f"{error.message}\n")
                exit_code = 1
                break
            outputs.append(result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace"))
            exit_code = result.exit_code if result.exit_code is not None else 128 + (result.signal or 0)
            if exit_code != 0:
                break
        return CodeResult(exit_code=exit_code, output="".join(outputs))

    def restart(self) -> None:
        """Nothing to restart: each block runs as a fresh process in the same sandbox."""


class CodeResult:
    """What `execute_code_blocks` returns: the last block's exit code and every block's output."""

    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output
