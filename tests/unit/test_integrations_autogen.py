"""The AutoGen code executors: blocks run in order in contexts of the executor's own (state kept between calls),
stop at the first failure, and report as AutoGen's executors do; sync (AutoGen 0.2 / AG2) and async (autogen_core)
on a fake sandbox, then the async one against a real code server (`code_installation`)."""

from __future__ import annotations

import asyncio

import pytest

from microvm_integrations.autogen_executor import AsyncSandboxCodeExecutor, CodeBlock, CodeResult, SandboxCodeExecutor
from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from tests.inprocess import tenant_caller
from tests.unit.data.integrations.fake_sandbox import AsyncFakeSandbox, FakeSandbox

pytestmark = pytest.mark.timeout(180)


def test_blocks_keep_state_across_calls_and_shell_blocks_run_too():
    executor = SandboxCodeExecutor(FakeSandbox())
    first = executor.execute_code_blocks([CodeBlock(code="x = 2", language="python")])
    assert first == CodeResult(exit_code=0, output="")
    second = executor.execute_code_blocks([CodeBlock("print(x * 21)", "python"), CodeBlock("echo done", "sh")])
    assert second == CodeResult(exit_code=0, output="42\ndone\n")


def test_blocks_stop_at_the_first_failure_with_its_exit_code():
    executor = SandboxCodeExecutor(FakeSandbox())
    result = executor.execute_code_blocks(
        [CodeBlock("echo first", "bash"), CodeBlock("exit 3", "bash"), CodeBlock("echo never", "bash")]
    )
    assert result == CodeResult(exit_code=3, output="first\n[exit code 3]\n")
    raised = executor.execute_code_blocks([CodeBlock("raise ValueError('bad')", "python"), CodeBlock("1", "python")])
    assert raised.exit_code == 1 and raised.output.rstrip().endswith("ValueError: bad")


def test_an_unknown_language_is_a_failed_block_naming_it():
    result = SandboxCodeExecutor(FakeSandbox()).execute_code_blocks([CodeBlock("x", "cobol")])
    assert result.exit_code == 1 and "unsupported language 'cobol'" in result.output


def test_restart_forgets_the_state_and_close_deletes_the_contexts():
    sandbox = FakeSandbox()
    executor = SandboxCodeExecutor(sandbox)
    executor.execute_code_blocks([CodeBlock("x = 1", "python")])
    executor.restart()
    assert "NameError" in executor.execute_code_blocks([CodeBlock("x", "python")]).output
    executor.close()
    assert sandbox.namespaces == {}


async def test_the_async_executor_keeps_state_and_links_the_cancellation_token():
    linked = []

    class Token:  # autogen_core.CancellationToken's one method an executor uses
        def link_future(self, future: asyncio.Future) -> asyncio.Future:
            linked.append(future)
            return future

    sandbox = FakeSandbox()
    async with AsyncSandboxCodeExecutor(AsyncFakeSandbox(sandbox)) as executor:
        await executor.execute_code_blocks([CodeBlock("x = 20", "python")], Token())
        result = await executor.execute_code_blocks([CodeBlock("x + 22", "python")], Token())
        assert result == CodeResult(exit_code=0, output="42\n") and len(linked) == 2
    assert sandbox.namespaces == {}  # leaving the executor deletes its contexts


# --- against a real code server ---------------------------------------------------------------------------------
async def test_the_async_executor_keeps_state_on_a_real_code_interpreter_sandbox(code_installation):
    caller = await tenant_caller(code_installation, f"autogen-{code_installation.node}")
    async with AsyncClient(await code_installation.address("gateway"), caller.key) as client:
        sandbox = await AsyncSandbox.create("code-interpreter", client=client)
        try:
            async with AsyncSandboxCodeExecutor(sandbox) as executor:
                assert (await executor.execute_code_blocks([CodeBlock("x = 2", "python")])).exit_code == 0
                result = await executor.execute_code_blocks(
                    [CodeBlock("print(x * 21)", "python"), CodeBlock("echo done", "sh")]
                )
                assert result == CodeResult(exit_code=0, output="42\ndone\n")
                failed = await executor.execute_code_blocks([CodeBlock("1/0", "python")])
                assert failed.exit_code == 1 and "ZeroDivisionError" in failed.output
        finally:
            await sandbox.kill()
