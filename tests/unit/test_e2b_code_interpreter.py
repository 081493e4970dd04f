"""The unmodified e2b-code-interpreter SDK (2.11.5) against services/gateway/e2b/code_interpreter.py, over a real
in-process installation whose `code-interpreter` sandboxes reach a real code server with real kernels on this host.

The SDK sends its port-49999 requests to E2B_SANDBOX_URL (here: `sandbox_url`); a small aiohttp app there stands in
for the front door (sandbox_traffic.py), which resolves the sandbox and the credential and calls `handle`
(tests/e2b_code_front.py).
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from e2b import ConnectionConfig, NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox
from e2b_code_interpreter.charts import BarChart, BoxAndWhiskerChart, LineChart, PieChart, SuperChart
from e2b_code_interpreter.models import Context
from packaging.version import Version

from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from tests.e2b_code_front import code_front_door
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(240)
E2B_KEY = "e2b_" + "0" * 40  # the SDK's own key check wants this form; the stand-in front door uses the tenant's key


@pytest.fixture(scope="module")
async def caller(code_installation):
    return await tenant_caller(code_installation, f"e2b-code-{code_installation.node}")


@pytest.fixture(scope="module")
async def sandbox_id(caller) -> str:
    reply = await caller.stub.CreateSandbox(
        sandbox_api.CreateSandboxRequest(sandbox=dict(template="code-interpreter")),
        metadata=caller.metadata,
        timeout=60,
    )
    return reply.sandbox.name.removeprefix("sandboxes/")


@pytest.fixture(scope="module")
async def sandbox_url(caller):
    async with code_front_door(caller) as url:
        yield url


def sdk_options(sandbox_id: str, sandbox_url: str) -> dict:
    config = ConnectionConfig(api_key=E2B_KEY, sandbox_url=sandbox_url, api_url="http://127.0.0.1:9")
    return dict(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=Version("0.4.0"),
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=config,
    )


@pytest.fixture
def sbx(sandbox_id, sandbox_url) -> AsyncSandbox:
    return AsyncSandbox(**sdk_options(sandbox_id, sandbox_url))


async def test_state_carries_across_calls(sbx):
    first = await sbx.run_code("x = 41")
    second = await sbx.run_code("x + 1")
    assert second.text == "42" and second.error is None
    assert second.execution_count == first.execution_count + 1
    (result,) = second.results
    assert result.is_main_result and result.text == "42"


async def test_stdout_and_stderr_reach_the_callbacks_as_they_are_written(sbx):
    seen = []
    execution = await sbx.run_code(
        "import sys\nprint('out', flush=True)\nprint('err', file=sys.stderr, flush=True)",
        on_stdout=lambda message: seen.append(("stdout", message.line, message.error, message.timestamp)),
        on_stderr=lambda message: seen.append(("stderr", message.line, message.error, message.timestamp)),
    )
    assert [entry[:3] for entry in seen] == [("stdout", "out\n", False), ("stderr", "err\n", True)]
    assert all(isinstance(entry[3], int) and entry[3] > 0 for entry in seen)
    assert execution.logs.stdout == ["out\n"] and execution.logs.stderr == ["err\n"]


async def test_output_reaches_the_caller_while_the_cell_still_runs(sbx, tmp_path):
    """The cell waits for a file that only the stdout callback creates: a buffered answer would never get there."""
    go = tmp_path / "go"
    execution = await sbx.run_code(
        f"import os, time\nprint('waiting', flush=True)\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.02)\n"
        "print('released')",
        on_stdout=lambda message: go.touch(),
    )
    assert execution.logs.stdout == ["waiting\n", "released\n"]


async def test_an_exception_comes_back_with_its_traceback_and_the_next_run_works(sbx):
    errors = []
    failed = await sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert failed.error.name == "ZeroDivisionError" and "division by zero" in failed.error.value
    assert "1 / 0" in failed.error.traceback and "\x1b[" not in failed.error.traceback
    assert errors == [failed.error] and failed.results == []
    assert (await sbx.run_code("'still here'")).text == "'still here'"


async def test_a_plot_comes_back_as_png_and_chart_and_a_frame_as_data(sbx):
    execution = await sbx.run_code(
        "import matplotlib.pyplot as plt, pandas as pd\n"
        "plt.plot([1, 2, 3], [4, 5, 7], label='sales'); plt.title('Sales'); plt.xlabel('day'); plt.ylabel('units')\n"
        "plt.show()\n"
        "pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"
    )
    plot, frame = execution.results
    assert base64.b64decode(plot.png).startswith(b"\x89PNG") and not plot.is_main_result
    chart = plot.chart
    assert isinstance(chart, LineChart) and chart.title == "Sales"
    assert (chart.x_label, chart.y_label) == ("day", "units")
    (line,) = chart.elements
    assert line.label == "sales" and line.points == [(1, 4), (2, 5), (3, 7)]
    assert frame.is_main_result and frame.data == {"a": [1, 2], "b": ["x", "y"]} and "<table" in frame.html
    assert "chart" in plot.formats() and "data" in frame.formats()


async def test_bar_pie_box_and_several_axes_become_e2b_chart_types(sbx):
    execution = await sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.bar(['a', 'b'], [3, 5]); plt.title('bars'); plt.show()\n"
        "plt.pie([1, 3], labels=['x', 'y']); plt.show()\n"
        "plt.boxplot([[1, 2, 3, 4, 5]]); plt.show()\n"
        "fig, (left, right) = plt.subplots(1, 2); left.plot([0, 1]); right.bar(['c'], [2]); fig.suptitle('two')\n"
        "plt.show()"
    )
    bar, pie, box, several = (result.chart for result in execution.results)
    assert isinstance(bar, BarChart) and bar.title == "bars"
    assert [(e.label, e.value) for e in bar.elements] == [("a", 3), ("b", 5)]
    assert isinstance(pie, PieChart) and [e.label for e in pie.elements] == ["x", "y"]
    assert sorted(round(e.angle) for e in pie.elements) == [90, 270]
    assert isinstance(box, BoxAndWhiskerChart)
    (whisker,) = box.elements
    assert (whisker.min, whisker.median, whisker.max) == (1, 3, 5)
    assert isinstance(several, SuperChart) and several.title == "two"
    assert [type(chart) for chart in several.elements] == [LineChart, BarChart]


async def test_rich_forms_come_back_under_e2b_names(sbx):
    execution = await sbx.run_code(
        "from IPython.display import display, HTML, Markdown, Latex, JSON, SVG\n"
        "display(HTML('<b>hi</b>'), Markdown('**md**'), Latex('$x$'), JSON({'k': [1, 2]}))\n"
        "display({'application/x-custom': 'raw', 'text/plain': 'custom'}, raw=True)\n"
        "SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>')"
    )
    html, markdown, latex, json_, custom, svg = execution.results
    assert html.html == "<b>hi</b>" and markdown.markdown == "**md**" and latex.latex == "$x$"
    assert json_.json == {"k": [1, 2]}
    assert custom.extra == {"application/x-custom": "raw"} and custom.text == "custom"
    assert svg.is_main_result and "<svg" in svg.svg


async def test_contexts_are_created_listed_restarted_and_removed(sbx):
    context = await sbx.create_code_context(cwd="/tmp")
    assert context.language == "python" and context.cwd == "/tmp"
    await sbx.run_code("secret = 7", context=context)
    assert (await sbx.run_code("import os; (secret, os.getcwd())", context=context)).text == "(7, '/tmp')"
    assert (await sbx.run_code("secret")).error.name == "NameError"  # the default context does not share it
    assert context.id in {listed.id for listed in await sbx.list_code_contexts()}
    await sbx.restart_code_context(context)
    assert (await sbx.run_code("secret", context=context)).error.name == "NameError"
    await sbx.remove_code_context(context.id)
    assert context.id not in {listed.id for listed in await sbx.list_code_contexts()}
    with pytest.raises(NotFoundException, match=context.id):
        await sbx.run_code("1", context=context)


@pytest.mark.parametrize(
    ("language", "first", "second", "expected"),
    [
        ("bash", "COUNT=20; cd /tmp", 'echo "$((COUNT + 22)) $PWD"', "42 /tmp\n"),
        ("javascript", "var n = 41", "n + 1", "42"),
    ],
)
async def test_bash_and_javascript_keep_state(sbx, language, first, second, expected):
    assert (await sbx.run_code(first, language=language)).error is None
    execution = await sbx.run_code(second, language=language)
    assert expected in ["".join(execution.logs.stdout), execution.text]
    assert language in {context.language for context in await sbx.list_code_contexts()}


async def test_a_javascript_context_runs_javascript(sbx):
    context = await sbx.create_code_context(language="js")
    assert context.language == "javascript"
    assert (await sbx.run_code("[1, 2].map(v => v * 21).pop()", context=context)).text == "42"


async def test_per_run_env_vars_apply_to_that_run_only(sbx):
    read = "import os; os.environ.get('RUN_ONLY', 'unset')"
    assert (await sbx.run_code(read, envs={"RUN_ONLY": "here"})).text == "'here'"
    assert (await sbx.run_code(read)).text == "'unset'"


async def test_an_unknown_language_or_context_is_refused_with_our_message(sbx):
    with pytest.raises(SandboxException, match="400.*cobol.*python"):
        await sbx.run_code("1", language="cobol")
    with pytest.raises(NotFoundException, match="nope"):
        await sbx.run_code("1", context=Context(context_id="nope", language="python", cwd="/"))
    with pytest.raises(SandboxException, match="400.*cwd"):
        await sbx.create_code_context(cwd="/no/such/dir")
    with pytest.raises(NotFoundException):
        await sbx.restart_code_context("nope")


async def test_the_sdk_timeout_interrupts_the_run_and_keeps_the_state(sbx):
    await sbx.run_code("kept = 'yes'")
    with pytest.raises(TimeoutException, match="Execution timed out"):
        await sbx.run_code("print('looping', flush=True)\nwhile True:\n    pass", timeout=1)
    # Were the loop still running, this run would wait behind it for ever (past the test's timeout).
    assert (await sbx.run_code("kept")).text == "'yes'"


async def test_the_sync_sdk_runs_code_too(sandbox_id, sandbox_url):
    def run() -> tuple:
        sandbox = Sandbox(**sdk_options(sandbox_id, sandbox_url))
        out = []
        execution = sandbox.run_code("print('sync'); 6 * 7", on_stdout=lambda message: out.append(message.line))
        return execution.text, out, [context.id for context in sandbox.list_code_contexts()]

    text, out, contexts = await asyncio.to_thread(run)
    assert text == "42" and out == ["sync\n"] and "default" in contexts


async def test_a_sandbox_deleted_mid_run_ends_the_run_with_our_error(caller, sandbox_url):
    """E2B's server would just drop the connection; ours ends the stream with the run's error, saying why. (A context of
    its own: the module's sandboxes share one host code server, which outlives the deleted sandbox.)"""
    create = sandbox_api.CreateSandboxRequest(sandbox=dict(template="code-interpreter"))
    doomed = (await caller.stub.CreateSandbox(create, metadata=caller.metadata, timeout=60)).sandbox.name
    gone = AsyncSandbox(**sdk_options(doomed.removeprefix("sandboxes/"), sandbox_url))
    context = await gone.create_code_context()
    started = asyncio.Event()
    run = asyncio.ensure_future(
        gone.run_code(
            "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.1)",
            context=context,
            on_stdout=lambda _: started.set(),
        )
    )
    await started.wait()
    await caller.stub.DeleteSandbox(sandbox_api.DeleteSandboxRequest(name=doomed), metadata=caller.metadata)
    execution = await run
    assert execution.error.name == "UNAVAILABLE" and "went away" in execution.error.value
    assert execution.logs.stdout == ["started\n"]
