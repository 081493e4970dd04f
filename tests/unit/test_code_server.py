"""The code-interpreter template's code server (images/templates/code-interpreter/mvm_code_server.py), run on the
host as a subprocess against real Jupyter kernels (ipykernel and jupyter_client from the venv). One server for the
module: its kernels take a second or two to start."""

import asyncio
import base64
import time

import pytest

from tests.code_server import host_code_server, of_type, request, run, text

pytest.importorskip("ipykernel", reason="ipykernel is in requirements.lock: run make venv")
pytest.importorskip("jupyter_client", reason="jupyter-client is in requirements.lock: run make venv")

MAX_OUTPUT_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def code_socket(tmp_path_factory):
    home = tmp_path_factory.mktemp("code-server")
    with host_code_server(home, max_output_bytes=MAX_OUTPUT_BYTES) as socket_path:
        yield str(socket_path)
    assert not socket_path.exists(), "the server removes its socket when it stops"


def stdout(events: list[dict]) -> str:
    return text(events)


async def new_context(socket_path: str, **fields) -> str:
    [reply] = await request(socket_path, {"op": "create_context", **fields})
    assert reply["type"] == "context", reply
    return reply["context"]["id"]


async def test_state_persists_and_the_last_expression_is_the_main_result(code_socket):
    assert (await run(code_socket, "x = 41"))[-1]["status"] == "ok"
    events = await run(code_socket, "x + 1")
    [result] = of_type(events, "result")
    assert result["is_main_result"] is True
    assert result["data"]["text/plain"] == "42"
    assert events[-1]["type"] == "end" and events[-1]["status"] == "ok"
    assert isinstance(events[-1]["execution_count"], int)


async def test_a_new_context_starts_at_execution_count_one_with_no_trace_of_the_servers_warm_up(code_socket):
    # The server runs warm-up cells in every new Python kernel before a user can; they must not show.
    context = await new_context(code_socket)
    events = await run(
        code_socket,
        "print(repr(_), repr(__), sorted(Out), [n for n in dir() if n.startswith('_mvm')])",
        context=context,
    )
    assert stdout(events) == "'' '' [] []\n"
    assert events[-1]["execution_count"] == 1
    events = await run(code_socket, "7", context=context)
    assert events[-1]["execution_count"] == 2 and of_type(events, "result")[0]["data"]["text/plain"] == "7"
    assert stdout(await run(code_socket, "print(_, Out)", context=context)) == "7 {2: 7}\n"
    await request(code_socket, {"op": "delete_context", "context": context})


async def test_the_ready_checks_warm_up_run_never_touches_a_context_a_user_ran_code_in(code_socket):
    before = (await run(code_socket, "'kept'"))[-1]["execution_count"]
    [reply] = await request(code_socket, {"op": "warm"})
    assert reply == {"type": "warmed", "context": "default"}
    events = await run(code_socket, f"print(_, Out[{before}])")
    assert stdout(events) == "kept kept\n" and events[-1]["execution_count"] == before + 1


async def test_stdout_and_stderr_stream_as_separate_events(code_socket):
    events = await run(code_socket, "import sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    assert stdout(events) == "to out\n"
    assert "".join(event["text"] for event in of_type(events, "stderr")) == "to err\n"
    assert events[-1]["status"] == "ok"


async def test_the_kernels_shorter_message_path_keeps_output_in_order_and_counts_right(code_socket):
    # kernel_messages.py: no execute_input, and an empty stream's flush returns at once. Both must be installed on
    # the host's ipykernel as on the guest's, and output printed before, between and after values keeps its order.
    probe = "import sys\nprint(get_ipython().kernel._publish_execute_input.__name__, type(sys.stdout).flush.__name__)"
    assert stdout(await run(code_socket, probe)) == "_no_execute_input empty_flush_returns\n"
    code = "import sys\nfor n in range(3):\n    print('line', n)\n    sys.stdout.flush()\n    display(n)\n"
    code += "print('end')\n'last'"
    events = await run(code_socket, code)
    kinds = [(e["type"], e.get("text") or e.get("data", {}).get("text/plain")) for e in events if e["type"] != "end"]
    shown = [(kind, value) for kind, value in kinds if value and value.strip()]
    assert shown == [
        ("stdout", "line 0\n"),
        ("result", "0"),
        ("stdout", "line 1\n"),
        ("result", "1"),
        ("stdout", "line 2\n"),
        ("result", "2"),
        ("stdout", "end\n"),
        ("result", "'last'"),
    ], kinds
    count = events[-1]["execution_count"]
    assert isinstance(count, int) and (await run(code_socket, "1"))[-1]["execution_count"] == count + 1


async def test_exception_gives_name_value_traceback_and_the_next_run_works(code_socket):
    events = await run(code_socket, "def f():\n    raise ValueError('bad input')\nf()")
    [error] = of_type(events, "error")
    assert (error["name"], error["value"]) == ("ValueError", "bad input")
    assert any("raise ValueError" in line for line in error["traceback"])
    assert not any("\x1b[" in line for line in error["traceback"]), "tracebacks come without ANSI colours"
    assert events[-1]["status"] == "error"
    assert of_type(await run(code_socket, "2 * 21"), "result")[0]["data"]["text/plain"] == "42"


async def test_two_contexts_never_see_each_others_variables(code_socket, tmp_path):
    first = await new_context(code_socket, cwd=str(tmp_path), env={"MVM_TEST_VAR": "first"})
    second = await new_context(code_socket)
    await run(code_socket, "secret = 'first'", context=first)
    events = await run(code_socket, "secret", context=second)
    assert of_type(events, "error")[0]["name"] == "NameError"
    events = await run(code_socket, "import os\nprint(secret, os.getcwd(), os.environ['MVM_TEST_VAR'])", context=first)
    assert stdout(events) == f"first {tmp_path} first\n"
    [listed] = await request(code_socket, {"op": "list_contexts"})
    assert {"default", first, second} <= {context["id"] for context in listed["contexts"]}
    assert "python" in listed["languages"]
    for context in (first, second):
        assert (await request(code_socket, {"op": "delete_context", "context": context}))[0]["type"] == "deleted"


async def test_timeout_interrupts_the_kernel_and_keeps_its_state(code_socket):
    context = await new_context(code_socket)
    await run(code_socket, "kept = 'still here'", context=context)
    started = time.monotonic()
    events = await run(
        code_socket, "import time\nprint('before', flush=True)\ntime.sleep(60)", context=context, timeout=1
    )
    assert time.monotonic() - started < 10
    assert events[-1]["status"] == "timeout"
    assert stdout(events) == "before\n"
    assert of_type(events, "error")[0]["name"] == "TimeoutError"
    assert stdout(await run(code_socket, "print(kept)", context=context)) == "still here\n"
    await request(code_socket, {"op": "delete_context", "context": context})


async def test_interrupt_from_another_connection_ends_the_run_and_keeps_state(code_socket):
    context = await new_context(code_socket)
    await run(code_socket, "kept = 7", context=context)
    running = asyncio.ensure_future(run(code_socket, "import time\ntime.sleep(60)", context=context))
    await asyncio.sleep(0.5)
    [reply] = await request(code_socket, {"op": "interrupt", "context": context})
    assert reply == {"type": "interrupted", "context": context}
    events = await asyncio.wait_for(running, 10)
    assert of_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    assert events[-1]["status"] == "error"
    assert of_type(await run(code_socket, "kept", context=context), "result")[0]["data"]["text/plain"] == "7"
    await request(code_socket, {"op": "delete_context", "context": context})


async def test_a_kernel_that_dies_ends_the_run_and_the_next_run_gets_a_fresh_kernel(code_socket):
    context = await new_context(code_socket)
    await run(code_socket, "lost = 1", context=context)
    events = await run(code_socket, "import os\nos._exit(1)", context=context)
    assert events[-1]["status"] == "kernel_died"
    [error] = of_type(events, "error")
    assert error["name"] == "KernelDied" and context in error["value"] and "exit code 1" in error["value"]
    events = await run(code_socket, "'lost' in globals(), 40 + 2", context=context)
    assert events[-1] == {**events[-1], "status": "ok", "restarted": True}
    assert of_type(events, "result")[0]["data"]["text/plain"] == "(False, 42)"
    assert "restarted" not in (await run(code_socket, "1", context=context))[-1]
    await request(code_socket, {"op": "delete_context", "context": context})


async def test_output_past_the_bound_is_truncated_and_flagged(code_socket):
    events = await run(code_socket, "for i in range(20000):\n    print('x' * 99)")
    sent = sum(len(event["text"].encode()) for event in of_type(events, "stdout"))
    assert sent <= MAX_OUTPUT_BYTES
    assert sent > MAX_OUTPUT_BYTES // 2
    assert events[-1]["truncated"] is True and events[-1]["status"] == "ok"
    assert "truncated" not in (await run(code_socket, "print('small')"))[-1]


async def test_matplotlib_plots_come_back_as_png_and_chart_data(code_socket):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed in this venv")
    events = await run(
        code_socket,
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [2, 4, 8], label='growth')\n"
        "plt.title('Doubling'); plt.xlabel('step'); plt.ylabel('value')\n"
        "plt.show()",
    )
    [figure] = [event for event in of_type(events, "result") if "image/png" in event["data"]]
    assert base64.b64decode(figure["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    chart = figure["chart"]
    assert (chart["type"], chart["title"], chart["x_label"], chart["y_label"]) == ("line", "Doubling", "step", "value")
    assert chart["elements"] == [{"label": "growth", "points": [[1, 2], [2, 4], [3, 8]]}]

    events = await run(code_socket, "plt.bar(['a', 'b', 'c'], [3, 1, 2]); plt.title('Counts')")
    [figure] = [event for event in of_type(events, "result") if "image/png" in event["data"]]
    assert figure["is_main_result"] is False
    assert figure["chart"]["type"] == "bar" and figure["chart"]["title"] == "Counts"
    assert [(e["label"], e["value"]) for e in figure["chart"]["elements"]] == [("a", 3), ("b", 1), ("c", 2)]


async def test_scatter_pie_and_box_plots_come_back_as_chart_data(code_socket):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed in this venv")

    async def chart(code: str) -> dict:
        events = await run(code_socket, "import matplotlib.pyplot as plt\n" + code + "\nplt.show()")
        [figure] = [event for event in of_type(events, "result") if "chart" in event]
        return figure["chart"]

    scatter = await chart("plt.scatter([1, 2], [3, 4], label='pts')")
    assert scatter["type"] == "scatter" and scatter["elements"] == [{"label": "pts", "points": [[1, 3], [2, 4]]}]
    pie = await chart("plt.pie([1, 3], labels=['a', 'b'])")
    assert pie["type"] == "pie"
    assert [(e["label"], e["fraction"]) for e in pie["elements"]] == [("a", 0.25), ("b", 0.75)]
    box = await chart("plt.boxplot([[1, 2, 3, 4, 5, 100]]); plt.xticks([1], ['sample'])")
    assert box["type"] == "box"
    assert box["elements"] == [
        {
            "label": "sample",
            "min": 1,
            "first_quartile": 2.25,
            "median": 3.5,
            "third_quartile": 4.75,
            "max": 5,
            "outliers": [100],
        }
    ]


async def test_dataframes_come_back_as_html_and_table_data(code_socket):
    pytest.importorskip("pandas", reason="pandas is not installed in this venv")
    events = await run(
        code_socket, "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [3.5, None]})"
    )
    [result] = of_type(events, "result")
    assert result["is_main_result"] is True
    assert "<table" in result["data"]["text/html"]
    assert result["table"]["columns"] == ["city", "temp"]
    assert result["table"]["rows"] == [["Oslo", 3.5], ["Lima", None]]
    assert result["table"]["total_rows"] == 2


async def test_unknown_context_and_language_are_refused_with_what_exists(code_socket):
    [refused] = await run(code_socket, "1", context="no-such-context")
    assert refused["type"] == "error" and refused["refused"] is True and refused["name"] == "context_not_found"
    [refused] = await request(code_socket, {"op": "create_context", "language": "cobol"})
    assert refused["name"] == "unknown_language" and "python" in refused["languages"]
    assert "python" in refused["value"]
    [refused] = await run(code_socket, "1", language="cobol")
    assert refused["name"] == "unknown_language"
    [refused] = await request(code_socket, {"op": "frobnicate"})
    assert refused["name"] == "bad_request"


async def test_restart_context_gives_a_fresh_kernel(code_socket):
    context = await new_context(code_socket)
    await run(code_socket, "gone = True", context=context)
    [reply] = await request(code_socket, {"op": "restart_context", "context": context})
    assert reply["type"] == "context" and reply["context"]["id"] == context
    events = await run(code_socket, "gone", context=context)
    assert of_type(events, "error")[0]["name"] == "NameError"
    await request(code_socket, {"op": "delete_context", "context": context})
    [refused] = await request(code_socket, {"op": "restart_context", "context": context})
    assert refused["name"] == "context_not_found"
