"""The LangChain tool and the AutoGen-style executor, invoked the way frameworks invoke them (no model)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from microvm_integrations.langchain_tool import SandboxCodeExecutor, SandboxCodeTool
from microvm_sandbox import Sandbox

pytestmark = pytest.mark.guest


@dataclass
class Block:
    language: str
    code: str


def test_langchain_tool_and_code_executor(stack):
    with Sandbox.create(address=stack.gateway_address, api_key=stack.admin_key) as sandbox:
        tool = SandboxCodeTool(sandbox=sandbox)
        assert tool.args["language"] and tool.args["code"]  # the schema an agent sees
        # The default template has no kernel: each call is a one-off interpreter (run_script).
        assert tool.invoke({"language": "python", "code": "print(6*7)"}) == "42\n"
        assert "[exit code 3]" in tool.invoke({"language": "sh", "code": "echo no >&2; exit 3"})
        assert "INVALID_ARGUMENT" in tool.invoke(
            {"language": "cobol", "code": "x"}
        ) or "unsupported language" in tool.invoke({"language": "cobol", "code": "x"})
        executor = SandboxCodeExecutor(sandbox)
        result = executor.execute_code_blocks([Block("python", "x = 2\nprint(x * 21)"), Block("sh", "echo done")])
        assert result.exit_code == 0 and result.output == "42\ndone\n"
        assert "bash" in tool.invoke({"language": "bash", "code": "echo ${BASH_VERSION:+bash}"})
        # A language the sandbox cannot run is a failed block with the reason, as AutoGen's executors report it.
        missing = executor.execute_code_blocks([Block("sh", "echo first"), Block("javascript", "1"), Block("sh", "x")])
        assert missing.exit_code == 1 and missing.output.startswith("first\n") and "`node`" in missing.output
