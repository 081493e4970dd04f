"""The code interpreter's wire (port 49999) as E2B's own server speaks it, below the SDK: the JSON lines of `/execute`
in E2B's order and shapes, refusals as plain-text statuses, and our charts in the shapes E2B's chart parser takes."""

from __future__ import annotations

import json

import aiohttp
import pytest
from e2b_code_interpreter.charts import BoxAndWhiskerChart, Chart, SuperChart, _deserialize_chart
from e2b_code_interpreter.models import Execution, parse_output

from microvm.sandbox.v1 import code_pb2
from microvm.sandbox.v1 import code_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from services.gateway.e2b.code_results import chart_of, lines_of
from tests.e2b_code_front import code_front_door
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def caller(code_installation):
    return await tenant_caller(code_installation, f"e2b-wire-{code_installation.node}")


async def create(caller, template: str) -> str:
    create = sandbox_api.CreateSandboxRequest(sandbox=dict(template=template))
    reply = await caller.stub.CreateSandbox(create, metadata=caller.metadata, timeout=60)
    return reply.sandbox.name.removeprefix("sandboxes/")


@pytest.fixture(scope="module")
async def http(caller):
    """An HTTP client whose requests reach port 49999 of a code-interpreter sandbox, as the SDK sends them."""
    sandbox = await create(caller, "code-interpreter")
    async with code_front_door(caller) as url:
        headers = {"E2b-Sandbox-Id": sandbox, "E2b-Sandbox-Port": "49999"}
        async with aiohttp.ClientSession(url, headers=headers) as session:
            yield session


async def execute(http, **body) -> list[dict]:
    async with http.post("/execute", json=body) as reply:
        assert reply.status == 200, await reply.text()
        return [json.loads(line) async for line in reply.content]


async def test_a_run_is_json_lines_in_e2b_order(http):
    lines = await execute(http, code="print('hi')\n6 * 7", context_id=None, language=None, env_vars=None)
    assert [line["type"] for line in lines] == ["stdout", "result", "number_of_executions", "end_of_execution"]
    assert lines[0]["text"] == "hi\n" and isinstance(lines[0]["timestamp"], int)
    assert lines[1] == {"type": "result", "is_main_result": True, "text": "42"}
    assert lines[2]["execution_count"] >= 1


async def test_an_error_line_has_name_value_and_the_traceback_as_text(http):
    lines = await execute(http, code="raise ValueError('bad')")
    (error,) = [line for line in lines if line["type"] == "error"]
    assert error["name"] == "ValueError" and error["value"] == "bad"
    assert isinstance(error["traceback"], str) and "ValueError" in error["traceback"]
    assert lines[-1] == {"type": "end_of_execution"}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"language": "python"}', 400, "code"),
        (b'{"code": "1", "env_vars": {"A": 1}}', 400, "env_vars"),
        (b'{"code": "1", "language": "cobol"}', 400, "cobol"),
        (b'{"code": "1", "context_id": "missing"}', 404, "missing"),
    ],
)
async def test_a_bad_execute_is_a_plain_text_refusal(http, body, status, says):
    async with http.post("/execute", data=body, headers={"Content-Type": "application/json"}) as reply:
        assert reply.status == status and reply.content_type == "text/plain"
        assert says in await reply.text()


async def test_contexts_are_e2b_context_objects(http):
    async with http.post("/contexts", json={"language": "python", "cwd": "/tmp"}) as reply:
        made = await reply.json()
    assert set(made) == {"id", "language", "cwd"} and made["cwd"] == "/tmp"
    async with http.get("/contexts") as reply:
        assert made in await reply.json()
    async with http.post(f"/contexts/{made['id']}/restart") as reply:
        assert reply.status == 204
    async with http.delete(f"/contexts/{made['id']}") as reply:
        assert reply.status == 204
    async with http.delete(f"/contexts/{made['id']}") as reply:
        assert reply.status == 404 and made["id"] in await reply.text()


async def test_an_unknown_route_is_404_naming_it(http):
    async with http.get("/kernels") as reply:
        assert reply.status == 404 and "GET /kernels" in await reply.text()


async def test_a_sandbox_without_the_code_server_says_so(caller):
    plain = await create(caller, "default")
    async with code_front_door(caller) as url:
        headers = {"E2b-Sandbox-Id": plain, "E2b-Sandbox-Port": "49999"}
        async with aiohttp.ClientSession(url, headers=headers) as session:
            async with session.post("/execute", json={"code": "1"}) as reply:
                assert reply.status == 400 and "code-interpreter" in await reply.text()


def test_an_unreadable_figure_is_an_e2b_unknown_chart():
    ours = {"type": "unknown", "title": "", "x_label": "", "y_label": "", "elements": [], "error": "ValueError()"}
    parsed = _deserialize_chart(chart_of(ours))
    assert type(parsed) is Chart and parsed.type == "unknown" and parsed.elements == []
    assert parsed.to_dict()["error"] == "ValueError()"


def test_a_box_missing_a_whisker_still_parses():
    box = {"label": "1", "first_quartile": 2, "median": 3, "third_quartile": 4, "outliers": [9]}
    ours = {"type": "box", "title": "t", "x_label": "", "y_label": "v", "elements": [box], "truncated": True}
    parsed = _deserialize_chart(chart_of(ours))
    assert isinstance(parsed, BoxAndWhiskerChart) and parsed.y_label == "v" and parsed.x_label is None
    (element,) = parsed.elements
    assert (element.min, element.median, element.max, element.outliers) == (None, 3, None, [9])
    assert parsed.to_dict()["truncated"] is True


def test_several_axes_nest_as_a_superchart():
    inner = {"type": "scatter", "title": "s", "elements": [{"label": "p", "points": [[1, 2]]}]}
    parsed = _deserialize_chart(chart_of({"type": "unknown", "title": "all", "elements": [inner]}))
    assert isinstance(parsed, SuperChart) and parsed.title == "all"
    (scatter,) = parsed.elements
    assert scatter.type == "scatter" and scatter.elements[0].points == [(1, 2)]


def test_the_sdk_parser_takes_every_line_we_write_keepalives_included():
    events = [
        api.RunCodeResponse(stdout=code_pb2.CodeOutput(text="a")),
        api.RunCodeResponse(keepalive=sandbox_api.Keepalive()),
        api.RunCodeResponse(result=code_pb2.CodeResult(is_main_result=True, text="1", png=b"\x89PNG")),
        api.RunCodeResponse(error=code_pb2.CodeError(name="E", value="v", traceback=["one", "two"])),
        api.RunCodeResponse(end=code_pb2.CodeRunEnd(status=code_pb2.CODE_RUN_STATUS_ERROR, execution_count=3)),
    ]
    execution = Execution()
    for event in events:
        for line in lines_of(event):
            parse_output(execution, line.decode())
    assert execution.logs.stdout == ["a"] and execution.execution_count == 3
    (result,) = execution.results
    assert result.text == "1" and result.png == "iVBORw==" and result.is_main_result
    assert (execution.error.name, execution.error.traceback) == ("E", "one\ntwo")
