"""The unmodified e2b-code-interpreter SDK end to end through the gateway's E2B doors: `Sandbox.create()` on the control
plane (its default template, `code-interpreter-v1`, is our `code-interpreter`), then run_code and contexts through the
in-sandbox traffic door, which hands port 49999 to code_interpreter.py. A real in-process installation whose
code-interpreter sandboxes reach a real code server with real kernels on this host; the sync SDK runs in a thread
(it blocks, and the installation serves from this loop)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from e2b_code_interpreter import AsyncSandbox, Sandbox
from e2b_code_interpreter.charts import LineChart

from tests.unit.e2b_fixtures import e2b_doors

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def doors(code_installation):
    with pytest.MonkeyPatch.context() as monkeypatch:
        async for found in e2b_doors(code_installation, monkeypatch):
            yield found


@pytest.fixture(scope="module")
async def sbx(doors):
    made = await AsyncSandbox.create(timeout=600)
    yield made
    await made.kill()


async def test_state_carries_across_calls(sbx):
    await sbx.run_code("x = 41")
    assert (await sbx.run_code("x + 1")).text == "42"


async def test_stdout_and_stderr_reach_the_callbacks(sbx):
    out, err = [], []
    await sbx.run_code(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)",
        on_stdout=lambda message: out.append(message.line),
        on_stderr=lambda message: err.append(message.line),
    )
    assert (out, err) == (["out\n"], ["err\n"])


async def test_an_error_has_its_traceback_and_the_next_run_works(sbx):
    failed = await sbx.run_code("1 / 0")
    assert failed.error.name == "ZeroDivisionError" and "1 / 0" in failed.error.traceback
    assert (await sbx.run_code("'after'")).text == "'after'"


async def test_a_plot_is_png_and_chart_and_a_frame_is_data(sbx):
    execution = await sbx.run_code(
        "import matplotlib.pyplot as plt, pandas as pd\n"
        "plt.plot([1, 2], [3, 4]); plt.title('t'); plt.show()\n"
        "pd.DataFrame({'n': [1, 2]})"
    )
    plot, frame = execution.results
    assert base64.b64decode(plot.png).startswith(b"\x89PNG")
    assert isinstance(plot.chart, LineChart) and plot.chart.title == "t"
    assert plot.chart.elements[0].points == [(1, 3), (2, 4)]
    assert frame.data == {"n": [1, 2]}


async def test_contexts_are_created_listed_restarted_and_removed(sbx):
    """SDK 2.11.5 sends no X-Access-Token on /contexts, only E2B-Traffic-Access-Token (create's trafficAccessToken)."""
    context = await sbx.create_code_context(cwd="/tmp")
    await sbx.run_code("mine = 1", context=context)
    assert context.id in {listed.id for listed in await sbx.list_code_contexts()}
    await sbx.restart_code_context(context)
    assert (await sbx.run_code("mine", context=context)).error.name == "NameError"
    await sbx.remove_code_context(context)
    assert context.id not in {listed.id for listed in await sbx.list_code_contexts()}


@pytest.mark.parametrize(
    ("language", "first", "second", "expected"),
    [("bash", "N=41", "echo $((N + 1))", "42\n"), ("javascript", "var n = 41", "n + 1", "42")],
)
async def test_bash_and_javascript(sbx, language, first, second, expected):
    await sbx.run_code(first, language=language)
    execution = await sbx.run_code(second, language=language)
    assert expected in ["".join(execution.logs.stdout), execution.text]


async def test_the_sdk_timeout_interrupts_the_run_through_the_door(sbx):
    from e2b import TimeoutException

    await sbx.run_code("kept = 'yes'")
    with pytest.raises(TimeoutException):
        await sbx.run_code("while True:\n    pass", timeout=1)
    # Were the loop still running, this run would wait behind it for ever (past the test's timeout).
    assert (await sbx.run_code("kept")).text == "'yes'"


async def test_the_sync_sdk(doors):
    def run() -> str:
        sandbox = Sandbox.create(timeout=600)
        try:
            return sandbox.run_code("6 * 7").text
        finally:
            sandbox.kill()

    assert await asyncio.to_thread(run) == "42"
