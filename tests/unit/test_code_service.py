"""CodeService end to end (gateway -> relay -> agent tunnel -> the code server's socket), against an in-process
installation whose `code-interpreter` sandboxes reach a real code server with real Python kernels on this host."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from microvm.sandbox.v1 import code_pb2, code_service_pb2_grpc
from microvm.sandbox.v1 import code_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from microvm.types.v1 import auth_pb2 as auth_types
from tests.inprocess import tenant_caller
from tests.unit.conftest import CODE_OUTPUT_BOUND

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def caller(code_installation):
    caller = await tenant_caller(code_installation, f"code-{code_installation.node}")
    caller.code = code_service_pb2_grpc.CodeServiceStub(caller.channel)
    return caller


async def create(caller, template: str) -> str:
    reply = await caller.stub.CreateSandbox(
        sandbox_api.CreateSandboxRequest(sandbox=dict(template=template)), metadata=caller.metadata, timeout=60
    )
    return reply.sandbox.name


@pytest.fixture(scope="module")
async def sandbox(caller):
    return await create(caller, "code-interpreter")


async def run(caller, sandbox: str, code: str, **fields) -> list[api.RunCodeResponse]:
    call = caller.code.RunCode(
        api.RunCodeRequest(sandbox=sandbox, code=code, **fields), metadata=caller.metadata, timeout=120
    )
    return [event async for event in call]


def of(events, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


async def test_state_persists_and_results_come_back(caller, sandbox):
    first = await run(caller, sandbox, "x = 20\nprint('set', x)")
    assert [o.text for o in of(first, "stdout")] == ["set 20\n"]
    end = first[-1].end
    assert end.status == code_pb2.CODE_RUN_STATUS_OK and end.context == "default" and end.execution_count >= 1
    second = await run(caller, sandbox, "x + 22")
    (result,) = of(second, "result")
    assert result.is_main_result and result.text == "42"
    assert second[-1].end.execution_count == end.execution_count + 1


async def test_a_sandbox_started_from_the_template_snapshot_runs_code(caller):
    """Warm starts restore the template snapshot (the fake VMM's disk archive): the code server is reached from it."""
    for _ in range(600):
        listed = await caller.stub.ListTemplates(sandbox_api.ListTemplatesRequest(), metadata=caller.metadata)
        if any(t.name.endswith("code-interpreter") and t.warm for t in listed.templates):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the code-interpreter template snapshot was never taken")
    warm = await create(caller, "code-interpreter")
    assert of(await run(caller, warm, "6 * 7"), "result")[0].text == "42"


async def test_a_plot_comes_back_as_png_and_chart_and_a_frame_as_table(caller, sandbox):
    events = await run(
        caller,
        sandbox,
        "import matplotlib.pyplot as plt, pandas as pd\n"
        "plt.plot([1, 2, 3], [4, 5, 7], label='sales'); plt.title('Sales'); plt.xlabel('day')\n"
        "plt.show()\n"
        "pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
    )
    results = of(events, "result")
    chart = next(r for r in results if r.HasField("chart"))
    assert chart.png.startswith(b"\x89PNG") and chart.chart.type == "line" and chart.chart.title == "Sales"
    (line,) = json_format.MessageToDict(chart.chart)["elements"]
    assert line == {"label": "sales", "points": [[1, 4], [2, 5], [3, 7]]}
    assert chart.chart.x_label == "day"
    table = next(r for r in results if r.HasField("table"))
    assert table.is_main_result and list(table.table.columns) == ["a", "b"] and table.table.total_rows == 2
    assert "<table" in table.html


async def test_an_exception_is_an_error_event_and_the_status(caller, sandbox):
    events = await run(caller, sandbox, "1 / 0")
    (error,) = of(events, "error")
    assert error.name == "ZeroDivisionError" and "division by zero" in error.value
    assert any("1 / 0" in line for line in error.traceback)
    assert events[-1].end.status == code_pb2.CODE_RUN_STATUS_ERROR


async def test_a_timeout_interrupts_and_keeps_the_state(caller, sandbox):
    await run(caller, sandbox, "kept = 'yes'")
    events = await run(caller, sandbox, "import time\ntime.sleep(600)", timeout=duration_pb2.Duration(seconds=1))
    assert events[-1].end.status == code_pb2.CODE_RUN_STATUS_TIMEOUT
    assert of(await run(caller, sandbox, "kept"), "result")[0].text == "'yes'"


async def test_a_caller_going_away_interrupts_the_run(caller, sandbox):
    call = caller.code.RunCode(
        api.RunCodeRequest(sandbox=sandbox, code="import time\nleft = 1\nprint('go', flush=True)\ntime.sleep(600)"),
        metadata=caller.metadata,
    )
    async for event in call:
        if event.WhichOneof("event") == "stdout":
            break
    call.cancel()
    # Were the cell still sleeping, this run would wait behind it past the test's timeout.
    assert of(await run(caller, sandbox, "left"), "result")[0].text == "1"


async def test_a_dead_kernel_is_named_and_the_next_run_gets_a_fresh_one(caller, sandbox):
    made = await caller.code.CreateCodeContext(api.CreateCodeContextRequest(sandbox=sandbox), metadata=caller.metadata)
    context = made.context.id
    await run(caller, sandbox, "doomed = 1", context=context)
    died = await run(caller, sandbox, "import os\nos._exit(1)", context=context)
    assert of(died, "error")[0].name == "KernelDied" and context in of(died, "error")[0].value
    assert died[-1].end.status == code_pb2.CODE_RUN_STATUS_KERNEL_DIED
    fresh = await run(caller, sandbox, "'doomed' in globals()", context=context)
    assert of(fresh, "result")[0].text == "False" and fresh[-1].end.restarted


async def test_output_past_the_bound_is_cut_and_flagged(caller, sandbox):
    events = await run(caller, sandbox, f"print('x' * {CODE_OUTPUT_BOUND + (1 << 20)})\n'after'")
    written = sum(len(o.text) for o in of(events, "stdout"))
    assert written <= CODE_OUTPUT_BOUND and events[-1].end.truncated
    assert events[-1].end.status == code_pb2.CODE_RUN_STATUS_OK


async def test_a_result_too_large_for_one_message_is_said_not_sent(caller, sandbox):
    events = await run(caller, sandbox, "from IPython.display import HTML\nHTML('<p>' + 'x' * (3 << 20) + '</p>')")
    (result,) = of(events, "result")
    assert result.is_main_result and not result.html and "left out" in result.text and "text/html" in result.text


async def test_contexts_are_isolated_restarted_and_deleted(caller, sandbox):
    code = caller.code
    made = await code.CreateCodeContext(
        api.CreateCodeContextRequest(sandbox=sandbox, cwd="/tmp", env={"WHO": "ctx"}), metadata=caller.metadata
    )
    context = made.context.id
    assert made.context.language == "python" and made.context.cwd == "/tmp"
    await run(caller, sandbox, "secret = 7", context=context)
    mine = await run(caller, sandbox, "import os; (secret, os.environ['WHO'], os.getcwd())", context=context)
    assert of(mine, "result")[0].text == "(7, 'ctx', '/tmp')" and mine[-1].end.context == context
    other = await run(caller, sandbox, "secret")
    assert of(other, "error")[0].name == "NameError"
    listed = await code.ListCodeContexts(api.ListCodeContextsRequest(sandbox=sandbox), metadata=caller.metadata)
    assert {"default", context} <= {c.id for c in listed.contexts} and "python" in listed.languages
    restart = api.RestartCodeContextRequest(sandbox=sandbox, context=context)
    await code.RestartCodeContext(restart, metadata=caller.metadata)
    assert of(await run(caller, sandbox, "secret", context=context), "error")[0].name == "NameError"
    delete = api.DeleteCodeContextRequest(sandbox=sandbox, context=context)
    await code.DeleteCodeContext(delete, metadata=caller.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await run(caller, sandbox, "1", context=context)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and context in gone.value.details()


async def test_per_run_env_applies_to_that_run_only(caller, sandbox):
    read = "import os; os.environ.get('RUN_ONLY', 'unset')"
    assert of(await run(caller, sandbox, read, env={"RUN_ONLY": "here"}), "result")[0].text == "'here'"
    assert of(await run(caller, sandbox, read), "result")[0].text == "'unset'"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"code": "x" * ((1 << 20) + 1)}, "longer than"),
        ({"code": "1", "timeout": duration_pb2.Duration(seconds=-1)}, "timeout"),
        ({"code": "1", "timeout": duration_pb2.Duration(seconds=90000)}, "timeout"),
        ({"code": "1", "language": "cobol"}, "cobol"),
        ({"code": "1", "context": "../etc"}, "context"),
        ({"code": "1", "env": {"A=B": "c"}}, "env"),
    ],
)
async def test_bad_requests_are_invalid_arguments(caller, sandbox, fields, says):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run(caller, sandbox, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in refused.value.details()


async def test_a_sandbox_without_the_code_server_says_so(caller):
    plain = await create(caller, "default")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await run(caller, plain, "1")
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "code-interpreter" in missing.value.details()


async def test_a_viewer_lists_contexts_but_may_not_run(code_installation, sandbox, caller):
    viewer = await tenant_caller(code_installation, f"code-{code_installation.node}", role=auth_types.ROLE_VIEWER)
    stub = code_service_pb2_grpc.CodeServiceStub(viewer.channel)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.RunCode(api.RunCodeRequest(sandbox=sandbox, code="1"), metadata=viewer.metadata).read()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_http_streams_a_run_as_json_lines(code_installation, caller, sandbox):
    url = f"{code_installation.http}/v1/{sandbox}:runCode"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {caller.key}"}) as http:
        async with http.post(url, json={"code": "print('hi'); 6 * 7"}) as reply:
            assert reply.status == 200, await reply.text()
            lines = [json.loads(line) async for line in reply.content if line.strip()]
    assert lines[0] == {"stdout": {"text": "hi\n"}}
    assert lines[1] == {"result": {"isMainResult": True, "text": "42"}}
    assert lines[-1]["end"]["status"] == "CODE_RUN_STATUS_OK" and lines[-1]["end"]["context"] == "default"


@pytest.mark.parametrize(
    ("language", "first", "second", "expected"),
    [
        ("bash", "COUNT=20; cd /tmp", 'echo "$((COUNT + 22)) $PWD"', "42 /tmp\n"),
        ("javascript", "var n = 41", "n + 1", "42"),
    ],
)
async def test_bash_and_javascript_keep_state_in_their_default_contexts(
    caller, sandbox, language, first, second, expected
):
    assert (await run(caller, sandbox, first, language=language))[-1].end.context == f"default-{language}"
    events = await run(caller, sandbox, second, language=language)
    assert expected in ["".join(o.text for o in of(events, "stdout")), *(r.text for r in of(events, "result"))]
    listed = await caller.code.ListCodeContexts(api.ListCodeContextsRequest(sandbox=sandbox), metadata=caller.metadata)
    assert language in listed.languages
