"""The Anthropic tool-use adapter: schemas in the Messages API shape, and one dispatcher answering recorded
`tool_use` blocks (tests/unit/data/integrations/*.json, as dicts and as the SDK's attribute objects) with
`tool_result` blocks on a fake sandbox, then against a real code server (`code_installation`). No network."""

from __future__ import annotations

import asyncio
import base64

import pytest

from microvm_integrations.anthropic_tools import AnthropicToolDispatcher, anthropic_tools
from microvm_integrations.openai_tools import openai_tools
from microvm_sandbox import Client, Sandbox
from tests.inprocess import tenant_caller
from tests.unit.data.integrations.fake_sandbox import PNG, AsyncFakeSandbox, FakeSandbox, as_objects, recorded

pytestmark = pytest.mark.timeout(180)


def test_the_tools_have_the_messages_api_shape_and_the_same_schemas_as_openai():
    tools = anthropic_tools()
    assert all(set(tool) == {"name", "description", "input_schema"} for tool in tools)
    assert [(t["name"], t["input_schema"]) for t in tools] == [
        (t["function"]["name"], t["function"]["parameters"]) for t in openai_tools()
    ]
    assert [tool["name"] for tool in anthropic_tools(["exec", "read_file"])] == ["exec", "read_file"]


@pytest.mark.parametrize("shape", [dict, as_objects])
def test_a_recorded_message_is_answered_with_a_user_message_of_tool_results(shape):
    sandbox = FakeSandbox()
    sandbox.files["/home/user/data.csv"] = b"a,b\n"
    answer = AnthropicToolDispatcher(sandbox).dispatch_all(shape(recorded("anthropic_message")))
    assert answer["role"] == "user"
    plotted, listed = answer["content"]
    assert plotted["type"] == "tool_result" and plotted["tool_use_id"] == "toolu_01A09q90qw90lq917835lq9"
    assert plotted["is_error"] is False
    text, image = plotted["content"]
    assert (
        text["type"] == "text"
        and '"title": "squares"' in text["text"]
        and "[3, 9]]" in text["text"]
        and "[image/png image, 70 bytes]" in text["text"]
    )
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert listed == {
        "type": "tool_result",
        "tool_use_id": "toolu_01BvXk2Lm8Qn4Rt6Wy0Zp3Hc",
        "content": [{"type": "text", "text": "data.csv  4 bytes"}],
        "is_error": False,
    }


def test_bad_blocks_become_error_results_the_model_can_read():
    dispatcher = AnthropicToolDispatcher(FakeSandbox())
    results = [dispatcher.dispatch(block) for block in recorded("bad_tool_calls")["anthropic"]]
    assert all(result["is_error"] for result in results)
    texts = [result["content"][0]["text"] for result in results]
    assert texts[0].startswith("error: unknown tool `rm_rf`")
    assert texts[1] == "error: run_code: missing required argument `code` (takes: code, language)"
    assert texts[2] == "error: read_file: unknown argument `encoding` (takes: path)"
    assert [result["tool_use_id"] for result in results] == ["toolu_unknown", "toolu_missing", "toolu_extra"]


def test_a_failing_run_is_an_error_result_and_an_image_file_is_an_image_block():
    sandbox = FakeSandbox()
    sandbox.files["/home/user/plot.png"] = base64.b64decode(PNG)
    dispatcher = AnthropicToolDispatcher(sandbox)
    failed = dispatcher.dispatch({"type": "tool_use", "id": "t1", "name": "run_code", "input": {"code": "1/0"}})
    assert failed["is_error"] and "ZeroDivisionError" in failed["content"][0]["text"]
    empty = dispatcher.dispatch({"type": "tool_use", "id": "t2", "name": "run_code", "input": {"code": "y = 1"}})
    assert empty["content"] == [{"type": "text", "text": "(no output)"}]  # the API refuses empty text blocks
    read = dispatcher.dispatch(
        {"type": "tool_use", "id": "t3", "name": "read_file", "input": {"path": "/home/user/plot.png"}}
    )
    assert read["content"][1]["source"]["data"] == PNG


async def test_an_async_sandbox_is_dispatched_with_adispatch():
    dispatcher = AnthropicToolDispatcher(AsyncFakeSandbox(FakeSandbox()))
    answer = await dispatcher.adispatch(
        {"type": "tool_use", "id": "t", "name": "exec", "input": {"command": "echo hi"}}
    )
    assert answer["content"] == [{"type": "text", "text": "hi\n"}] and not answer["is_error"]


# --- against a real code server ---------------------------------------------------------------------------------
async def test_recorded_tool_use_runs_on_a_real_code_interpreter_sandbox(code_installation):
    caller = await tenant_caller(code_installation, f"ant-{code_installation.node}")
    gateway = await code_installation.address("gateway")
    uses = [
        {"type": "tool_use", "id": "toolu_1", "name": "run_code", "input": {"code": "x = 41"}},
        {"type": "tool_use", "id": "toolu_2", "name": "run_code", "input": {"code": "print('hi')\nx + 1"}},
        {"type": "tool_use", "id": "toolu_3", "name": "run_code", "input": {"code": "undefined_name"}},
        {"type": "tool_use", "id": "toolu_4", "name": "exec", "input": {"command": "echo from-shell"}},
    ]

    def conversation() -> dict:
        with Client(gateway, caller.key) as client, Sandbox.create("code-interpreter", client=client) as sandbox:
            dispatcher = AnthropicToolDispatcher(sandbox)
            answer = dispatcher.dispatch_all({"role": "assistant", "content": uses})
            dispatcher.close()
            return answer

    answer = await asyncio.to_thread(conversation)
    texts = [(result["content"][0]["text"], result["is_error"]) for result in answer["content"]]
    assert texts[0] == ("(no output)", False) and texts[1] == ("hi\n42\n", False)
    assert texts[2][1] and "NameError" in texts[2][0] and "\x1b[" not in texts[2][0]
    assert texts[3] == ("from-shell\n", False)
