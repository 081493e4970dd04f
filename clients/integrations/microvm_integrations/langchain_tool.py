"""LangChain tools that run code and shell commands in a MicroVM sandbox (optional extra: langchain-core).

    tool = SandboxCodeTool(sandbox=Sandbox.create())
    tool.invoke({"code": "x = 41"})
    tool.invoke({"code": "x + 1"})                     # "42": state is kept between calls
    SandboxShellTool(sandbox=sandbox).invoke({"command": "ls /"})

The code tool runs each language in a code context of its own (made on first use, made again if it was
deleted), so two tools on one sandbox never see each other's variables. With an `AsyncSandbox`, use `ainvoke`.
Without langchain-core installed this module still imports; making a tool then raises ImportError.
"""

from __future__ import annotations

from typing import Any

from microvm_integrations.autogen_executor import CodeResult, SandboxCodeExecutor
from microvm_integrations.execution import CodeSession, Outcome, run_sync
from microvm_integrations.tools import TOOLS_BY_NAME, SandboxTools
from microvm_sandbox.errors import SandboxError

__all__ = ["CodeResult", "SandboxCodeExecutor", "SandboxCodeTool", "SandboxShellTool"]  # the executor moved

try:
    from langchain_core.tools import BaseTool
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as missing:
    _MISSING: ImportError | None = missing

    class SandboxCodeTool:  # type: ignore[no-redef]
        def __init__(self, *_: Any, **__: Any) -> None:
            raise ImportError("SandboxCodeTool needs langchain-core: pip install langchain-core") from _MISSING

    class SandboxShellTool(SandboxCodeTool):  # type: ignore[no-redef]
        pass

else:
    _MISSING = None

    def _answer(outcome: Outcome) -> str:
        text = outcome.text or "(no output)"
        return f"error:\n{text}" if outcome.is_error and not text.startswith("error:") else text

    class CodeInput(BaseModel):
        code: str = Field(description="the code to run, like a notebook cell; state persists between calls")
        language: str = Field(
            default="python", description="`python` (default), `bash`, `javascript`, or another the sandbox has"
        )

    class SandboxCodeTool(BaseTool):  # type: ignore[no-redef]
        """Runs code in a stateful kernel in an isolated microVM; returns output, results and error as text."""

        name: str = "microvm_run_code"
        description: str = TOOLS_BY_NAME["run_code"].description
        args_schema: type[BaseModel] = CodeInput
        sandbox: Any = None
        timeout_seconds: float = 120
        model_config = ConfigDict(arbitrary_types_allowed=True)
        _session: CodeSession | None = PrivateAttr(default=None)

        @property
        def session(self) -> CodeSession:
            """The tool's code contexts, one per language."""
            if self._session is None:
                self._session = CodeSession(self.sandbox, timeout=self.timeout_seconds)
            return self._session

        def _run(self, code: str, language: str = "python", **_: Any) -> str:
            return run_sync(self._arun(code, language))

        async def _arun(self, code: str, language: str = "python", **_: Any) -> str:
            try:
                return _answer(await self.session.run(code, language))
            except SandboxError as error:
                return f"error: {error.code}: {error.message}"

        def close(self) -> None:
            """Deletes the tool's code contexts (sync Sandbox; `aclose` for an AsyncSandbox)."""
            run_sync(self.session.close())

        async def aclose(self) -> None:
            await self.session.close()

    class CommandInput(BaseModel):
        command: str = Field(description="a shell command line, run with /bin/sh -c")

    class SandboxShellTool(BaseTool):  # type: ignore[no-redef]
        """Runs a shell command in an isolated microVM; returns its output and, when not 0, its exit code."""

        name: str = "microvm_exec"
        description: str = TOOLS_BY_NAME["exec"].description
        args_schema: type[BaseModel] = CommandInput
        sandbox: Any = None
        timeout_seconds: float = 120
        model_config = ConfigDict(arbitrary_types_allowed=True)

        def _run(self, command: str, **_: Any) -> str:
            return run_sync(self._arun(command))

        async def _arun(self, command: str, **_: Any) -> str:
            tools = SandboxTools(self.sandbox, timeout=self.timeout_seconds)
            return _answer(await tools.acall("exec", {"command": command}))
