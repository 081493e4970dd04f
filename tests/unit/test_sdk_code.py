"""The SDK's stateful code execution (`run_code`, code contexts), async and sync: first how CodeService events become
an `Execution`, then against an in-process installation whose `code-interpreter` sandboxes reach a real code server
on this host with real Python kernels (`code_installation`; one server per module, so contexts are shared between
the module's sandboxes: tests that change state use contexts of their own)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from microvm.sandbox.v1 import code_pb2
from microvm.sandbox.v1 import code_service_pb2 as code_api
from microvm_sandbox import (
    AsyncSandbox,
    CodeContext,
    CodeContextNotFound,
    CodeInterpreterMissing,
    InvalidArgumentError,
    Result,
    Sandbox,
)
from microvm_sandbox.aio import AsyncClient
from microvm_sandbox.code_models import ExecutionBuilder
from microvm_sandbox.errors import error_class
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT = """
import matplotlib.pyplot as plt
plt.plot([1, 2, 3], [4, 5, 6], label="rising")
plt.title("growth")
plt.xlabel("day")
plt.show()
"""


# --- events to an Execution ---------------------------------------------------------------------------------
def test_a_result_carries_every_form_with_binary_ones_as_base64_and_charts_and_tables_as_data(tmp_path):
    message = code_pb2.CodeResult(is_main_result=True, text="<Figure>", png=PNG_SIGNATURE + b"data", json='{"a": [1]}')
    message.other["application/x-custom"] = "yes"
    message.chart.type = "line"
    message.chart.title = "growth"
    message.chart.elements.append({"label": "rising", "points": [[1, 4], [2, 5]]})
    message.table.columns.extend(["a"])
    message.table.rows.append([1])
    message.table.index.append(0)
    message.table.total_rows = 1
    result = Result.from_message(message)
    assert result.png == base64.b64encode(PNG_SIGNATURE + b"data").decode()
    assert result.json == {"a": [1]} and str(result) == "<Figure>" and result.html is None
    assert result.formats() == ["text", "png", "json", "chart", "table", "application/x-custom"]
    assert result.chart["type"] == "line" and result.chart["elements"][0]["points"] == [[1.0, 4.0], [2.0, 5.0]]
    assert result.table == {"columns": ["a"], "index": [0.0], "rows": [[1.0]], "total_rows": 1, "truncated": False}
    assert result.save(tmp_path / "plot.png").read_bytes() == PNG_SIGNATURE + b"data"
    with pytest.raises(ValueError, match="no pdf"):
        result.image_bytes("pdf")


def test_the_builder_folds_events_into_an_execution_and_says_which_callback_gets_what():
    builder = ExecutionBuilder()
    events = [
        code_api.RunCodeResponse(stdout=code_pb2.CodeOutput(text="hi\n")),
        code_api.RunCodeResponse(keepalive={}),
        code_api.RunCodeResponse(result=code_pb2.CodeResult(is_main_result=True, text="42")),
        code_api.RunCodeResponse(error=code_pb2.CodeError(name="E", value="v", traceback=["a", "b"])),
        code_api.RunCodeResponse(
            end=code_pb2.CodeRunEnd(status=code_pb2.CODE_RUN_STATUS_TIMEOUT, execution_count=3, context="c")
        ),
    ]
    kinds = [(step[0] if step else None) for step in map(builder.add, events)]
    assert kinds == ["stdout", None, "result", "error", None] and builder.ended
    execution = builder.execution
    assert (execution.text, execution.status, execution.execution_count, execution.context) == ("42", "timeout", 3, "c")
    assert execution.error.traceback == "a\nb" and execution.logs.stdout == ["hi\n"]
    assert execution.to_dict()["results"] == [{"is_main_result": True, "text": "42"}]


def test_the_code_reasons_map_to_their_own_error_classes():
    assert error_class("NOT_FOUND", "CODE_CONTEXT_NOT_FOUND") is CodeContextNotFound
    assert error_class("FAILED_PRECONDITION", "CODE_INTERPRETER_MISSING") is CodeInterpreterMissing
    assert error_class("INVALID_ARGUMENT", "UNKNOWN_LANGUAGE") is InvalidArgumentError


# --- against an installation with a code server -------------------------------------------------------------
@pytest.fixture(scope="module")
async def installation(code_installation):
    caller = await tenant_caller(code_installation, f"sdkcode-{code_installation.node}")
    code_installation.gateway = await code_installation.address("gateway")
    code_installation.key = caller.key
    return code_installation


@pytest.fixture(scope="module")
async def sandbox(installation):
    client = AsyncClient(installation.gateway, installation.key)
    sandbox = await AsyncSandbox.create("code-interpreter", client=client)
    yield sandbox
    await sandbox.kill()
    await client.close()


async def test_state_persists_between_runs_and_the_cell_value_is_the_main_result(sandbox):
    context = await sandbox.create_code_context()
    first = await sandbox.run_code("x = 41", context=context)
    second = await sandbox.run_code("x + 1", context=context.id)
    assert (first.status, first.results, first.error) == ("ok", [], None)
    assert second.text == "42" and second.results[0].is_main_result and second.context == context.id
    assert second.execution_count == first.execution_count + 1


async def test_output_reaches_the_callbacks_plain_and_async_and_the_logs(sandbox):
    seen: list[tuple[str, object]] = []

    async def on_stderr(text: str) -> None:
        seen.append(("stderr", text))

    execution = await sandbox.run_code(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\n7",
        on_stdout=lambda text: seen.append(("stdout", text)),
        on_stderr=on_stderr,
        on_result=lambda result: seen.append(("result", result.text)),
    )
    assert "".join(execution.logs.stdout) == "out\n" and "".join(execution.logs.stderr) == "err\n"
    assert ("stdout", "out\n") in seen and ("stderr", "err\n") in seen and seen[-1] == ("result", "7")


async def test_a_matplotlib_plot_comes_back_as_a_png_and_as_chart_data(sandbox, tmp_path):
    execution = await sandbox.run_code(PLOT)
    assert execution.error is None, execution.error
    [plot] = [result for result in execution.results if result.png]
    assert base64.b64decode(plot.png).startswith(PNG_SIGNATURE) and "png" in plot.formats()
    assert plot.save(tmp_path / "plot.png").read_bytes().startswith(PNG_SIGNATURE)
    chart = plot.chart
    assert (chart["type"], chart["title"], chart["x_label"]) == ("line", "growth", "day")
    [line] = chart["elements"]
    assert line["label"] == "rising" and line["points"] == [[1, 4], [2, 5], [3, 6]]


async def test_a_dataframe_comes_back_as_html_and_table_data(sandbox):
    execution = await sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
    [table] = execution.results
    assert "<table" in table.html and table.is_main_result
    assert table.table["columns"] == ["a", "b"] and table.table["total_rows"] == 2
    assert table.table["rows"] == [[1, "x"], [2, None]] and table.table["index"] == [0, 1]


async def test_an_exception_is_the_executions_error_and_the_next_run_still_works(sandbox):
    errors = []
    execution = await sandbox.run_code("y = 1\n1 / 0", on_error=errors.append)
    assert execution.status == "error" and execution.text is None
    assert (execution.error.name, execution.error.value) == ("ZeroDivisionError", "division by zero")
    assert "1 / 0" in execution.error.traceback and "\x1b[" not in execution.error.traceback
    assert errors == [execution.error]
    assert (await sandbox.run_code("y + 1")).text == "2"


async def test_a_timeout_interrupts_the_run_and_the_context_keeps_its_state(sandbox):
    context = await sandbox.create_code_context()
    execution = await sandbox.run_code("import time\nkept = 5\ntime.sleep(60)", context=context, timeout=1)
    assert execution.status == "timeout" and execution.error is not None
    assert (await sandbox.run_code("kept", context=context)).text == "5"


async def test_contexts_do_not_see_each_others_variables_and_are_listed(sandbox):
    one, two = await sandbox.create_code_context(), await sandbox.create_code_context(envs={"WHO": "two"})
    await sandbox.run_code("secret = 'one'", context=one)
    leaked = await sandbox.run_code("secret", context=two)
    assert leaked.status == "error" and leaked.error.name == "NameError"
    assert (await sandbox.run_code("import os; os.environ['WHO']", context=two)).text == "'two'"
    listed = {context.id: context for context in await sandbox.list_code_contexts()}
    assert {one.id, two.id} <= set(listed) and listed[two.id].envs == {"WHO": "two"}
    assert listed[one.id].language == "python" and "python" in await sandbox.list_code_languages()


async def test_a_restart_loses_the_state_and_a_deleted_context_is_not_found(sandbox):
    context = await sandbox.create_code_context()
    await sandbox.run_code("lost = 1", context=context)
    restarted = await sandbox.restart_code_context(context)
    assert restarted.id == context.id
    assert (await sandbox.run_code("lost", context=context)).error.name == "NameError"
    await sandbox.delete_code_context(context.id)
    with pytest.raises(CodeContextNotFound):
        await sandbox.run_code("1", context=context)
    with pytest.raises(CodeContextNotFound):
        await sandbox.delete_code_context(context)


async def test_interrupt_ends_a_running_cell_and_keeps_the_state(sandbox):
    context = await sandbox.create_code_context()
    started = asyncio.Event()
    running = asyncio.ensure_future(
        sandbox.run_code(
            "import time\nstays = 3\nprint('started', flush=True)\ntime.sleep(60)",
            context=context,
            on_stdout=lambda text: started.set(),
        )
    )
    await asyncio.wait_for(started.wait(), 60)  # the cell runs: an interrupt before it would find nothing to stop
    await sandbox.interrupt_code(context)
    execution = await asyncio.wait_for(running, 60)
    assert execution.status == "error" and execution.error.name == "KeyboardInterrupt"
    assert (await sandbox.run_code("stays", context=context)).text == "3"


async def test_a_dead_kernel_ends_the_run_and_the_next_run_says_it_restarted(sandbox):
    context = await sandbox.create_code_context()
    await sandbox.run_code("before = 1", context=context)
    died = await sandbox.run_code("import os\nos._exit(1)", context=context)
    assert died.status == "kernel_died" and died.error is not None and died.error.name == "KernelDied"
    after = await sandbox.run_code("'before' in globals()", context=context)
    assert after.restarted and after.text == "False"


async def test_an_unknown_language_is_refused_naming_the_installed_ones(sandbox):
    with pytest.raises(InvalidArgumentError, match="python") as refused:
        await sandbox.run_code("1", language="cobol")
    assert refused.value.reason == "UNKNOWN_LANGUAGE"


async def test_a_sandbox_without_the_code_server_says_so(installation):
    async with AsyncClient(installation.gateway, installation.key) as client:
        plain = await AsyncSandbox.create(client=client)
        try:
            with pytest.raises(CodeInterpreterMissing):
                await plain.run_code("1")
            # The one-shot interpreter needs no code server.
            assert (await plain.run_script("python", "print(6 * 7)")).stdout == b"42\n"
        finally:
            await plain.kill()


async def test_the_sync_sdk_runs_code_with_the_same_names(installation, sandbox):
    def use() -> None:
        from microvm_sandbox import Client

        client = Client(installation.gateway, installation.key)
        sync_sandbox = Sandbox.connect(sandbox.id, client=client)
        context = sync_sandbox.create_code_context()
        assert isinstance(context, CodeContext)
        printed: list[str] = []
        sync_sandbox.run_code("z = 20", context=context)
        execution = sync_sandbox.run_code("print('hi'); z * 2", context=context, on_stdout=printed.append)
        assert execution.text == "40" and printed == ["hi\n"]  # the callback ran in this thread
        assert context.id in [c.id for c in sync_sandbox.list_code_contexts()]
        sync_sandbox.delete_code_context(context)
        with pytest.raises(CodeContextNotFound):
            sync_sandbox.run_code("z", context=context)
        client.close()

    await asyncio.to_thread(use)
