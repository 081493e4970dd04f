"""The LangChain tools: the code tool keeps state across invocations in a context of its own (made again when
deleted), answers output, results and errors as text, sync and async; the shell tool runs commands; the module
imports without langchain-core. On a fake sandbox, then against a real code server (`code_installation`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from microvm_integrations.langchain_tool import SandboxCodeTool, SandboxShellTool
from microvm_sandbox import Client, Sandbox
from tests.inprocess import tenant_caller
from tests.unit.data.integrations.fake_sandbox import AsyncFakeSandbox, FakeSandbox

pytestmark = pytest.mark.timeout(180)


def test_the_code_tool_keeps_state_and_two_tools_do_not_share_it():
    sandbox = FakeSandbox()
    tool, other = SandboxCodeTool(sandbox=sandbox), SandboxCodeTool(sandbox=sandbox)
    assert set(tool.args) == {"code", "language"} and tool.name == "microvm_run_code"
    assert tool.invoke({"code": "x = 41"}) == "(no output)"
    assert tool.invoke({"code": "print('hi')\nx + 1"}) == "hi\n42\n"
    assert "NameError" in other.invoke({"code": "x"})


def test_errors_are_text_and_a_deleted_context_is_made_again():
    sandbox = FakeSandbox()
    tool = SandboxCodeTool(sandbox=sandbox)
    answer = tool.invoke({"code": "1/0"})
    assert answer.startswith("error:\n") and "ZeroDivisionError: division by zero" in answer
    sandbox.delete_code_context(tool.session.contexts["python"])
    assert tool.invoke({"code": "7 * 6"}) == "42\n"
    assert tool.invoke({"code": "x", "language": "cobol"}).startswith("error: INVALID_ARGUMENT: unsupported language")
    assert tool.invoke({"code": "echo $0 >/dev/null; echo sh", "language": "sh"}) == "sh\n"


def test_the_shell_tool_answers_output_and_exit_code():
    tool = SandboxShellTool(sandbox=FakeSandbox())
    assert tool.invoke({"command": "echo hi"}) == "hi\n"
    assert tool.invoke({"command": "echo no >&2; exit 2"}) == "error:\nno\n[exit code 2]\n"


async def test_an_async_sandbox_is_used_through_ainvoke():
    sandbox = AsyncFakeSandbox(FakeSandbox())
    tool = SandboxCodeTool(sandbox=sandbox)
    await tool.ainvoke({"code": "y = 5"})
    assert await tool.ainvoke({"code": "y * 2"}) == "10\n"
    assert await SandboxShellTool(sandbox=sandbox).ainvoke({"command": "echo a"}) == "a\n"
    await tool.aclose()


def test_the_module_imports_without_langchain_and_says_what_to_install():
    script = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "from microvm_integrations.langchain_tool import SandboxCodeTool, SandboxCodeExecutor\n"
        "try:\n    SandboxCodeTool(sandbox=None)\nexcept ImportError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install langchain-core" in done.stdout


# --- against a real code server ---------------------------------------------------------------------------------
async def test_the_code_tool_keeps_state_on_a_real_code_interpreter_sandbox(code_installation):
    caller = await tenant_caller(code_installation, f"lc-{code_installation.node}")
    gateway = await code_installation.address("gateway")

    def agent_steps() -> list[str]:
        with Client(gateway, caller.key) as client, Sandbox.create("code-interpreter", client=client) as sandbox:
            tool = SandboxCodeTool(sandbox=sandbox)
            answers = [tool.invoke({"code": "x = 41"}), tool.invoke({"code": "x + 1"})]
            sandbox.delete_code_context(tool.session.contexts["python"])
            answers.append(tool.invoke({"code": "x"}))  # a fresh context: x is gone, the tool still answers
            answers.append(SandboxShellTool(sandbox=sandbox).invoke({"command": "echo shell"}))
            tool.close()
            return answers

    defined, value, after_delete, shell = await asyncio.to_thread(agent_steps)
    assert (defined, value, shell) == ("(no output)", "42\n", "shell\n")
    assert after_delete.startswith("error:\n") and "NameError" in after_delete
