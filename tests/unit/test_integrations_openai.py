"""The OpenAI tool-use adapter: schemas in the Chat Completions and Responses shapes, and one dispatcher answering
recorded tool calls (tests/unit/data/integrations/*.json, as dicts and as the SDK's attribute objects) on a fake
sandbox, then one conversation's calls against a real code server (`code_installation`). No network, no model."""

from __future__ import annotations

import asyncio
import base64
import copy
import re

import pytest

from microvm_integrations.openai_tools import OpenAIToolDispatcher, openai_tools
from microvm_sandbox import Client, Sandbox
from tests.inprocess import tenant_caller
from tests.unit.data.integrations.fake_sandbox import PNG, AsyncFakeSandbox, FakeSandbox, as_objects, recorded

pytestmark = pytest.mark.timeout(180)


def test_the_tools_have_chat_completions_and_responses_shapes():
    chat = openai_tools()
    assert [tool["function"]["name"] for tool in chat] == ["run_code", "exec", "read_file", "write_file", "list_files"]
    for tool in chat:
        assert tool["type"] == "function" and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool["function"]["name"])
        schema = tool["function"]["parameters"]
        assert schema["type"] == "object" and set(schema["required"]) <= set(schema["properties"])
    responses = openai_tools(["run_code"], api="responses")
    assert responses == [{"type": "function", **chat[0]["function"]}]


@pytest.mark.parametrize("shape", [dict, as_objects])
def test_recorded_chat_completion_calls_are_answered_as_tool_messages(shape):
    message = shape(recorded("openai_chat_completion"))
    message = message["choices"][0]["message"] if isinstance(message, dict) else message.choices[0].message
    dispatcher = OpenAIToolDispatcher(FakeSandbox())
    ran, wrote, listed = dispatcher.dispatch_all(message)
    assert ran == {"role": "tool", "tool_call_id": "call_Vq3pXn0Yb8kZ2rTg5HcLm1sA", "content": "set\n42\n"}
    assert wrote["tool_call_id"] == "call_8dJw2LcQn4Rk7TeYv0ZbPq3M" and wrote["content"] == (
        "wrote 6 bytes to /home/user/notes.txt"
    )
    assert listed["content"] == "notes.txt  6 bytes"
    again = {"id": "call_2", "type": "function", "function": {"name": "run_code", "arguments": '{"code": "x * 2"}'}}
    assert dispatcher.dispatch(again)["content"] == "82\n"  # the state of the earlier call is kept


def test_recorded_responses_calls_are_answered_as_function_call_outputs():
    outputs = OpenAIToolDispatcher(FakeSandbox()).dispatch_all(recorded("openai_responses")["output"])
    assert outputs == [
        {
            "type": "function_call_output",
            "call_id": "call_Tz4nQ8wLr2Yc6Vb1Hm0Ks5Pd",
            "output": "error:\nout\nerr\n[exit code 3]\n",
        },
        {
            "type": "function_call_output",
            "call_id": "call_Rb7kW3nXq9Lm2Dv5Tc8Hs1Jy",
            "output": "error: read_file: NOT_FOUND: /home/user/missing.txt: no such file or directory",
        },
    ]


def test_bad_calls_become_error_messages_the_model_can_read():
    dispatcher = OpenAIToolDispatcher(FakeSandbox())
    answers = [dispatcher.dispatch(call)["content"] for call in recorded("bad_tool_calls")["openai"]]
    assert answers[0].startswith("error: run_code: the arguments are not valid JSON")
    assert (
        answers[1]
        == "error: unknown tool `delete_everything`; the tools are: run_code, exec, read_file, write_file, list_files"
    )
    assert answers[2] == "error: write_file: missing required argument `content` (takes: path, content)"
    assert answers[3] == "error: exec: argument `command` must be a string, not list"
    assert answers[4] == "error: run_code: the arguments must be a JSON object, not list"


def test_images_are_saved_when_a_directory_is_given_and_noted_as_omitted_otherwise(tmp_path):
    call = {
        "id": "call_plot/1",
        "type": "function",
        "function": {"name": "run_code", "arguments": '{"code": "plot([1], [2])"}'},
    }
    omitted = OpenAIToolDispatcher(FakeSandbox()).dispatch(copy.deepcopy(call))["content"]
    assert (
        "[image/png image omitted: this tool result carries text only]" in omitted and '"points": [[1, 2]]' in omitted
    )
    saved = OpenAIToolDispatcher(FakeSandbox(), image_dir=tmp_path).dispatch(call)["content"]
    assert (tmp_path / "call_plot_1-1.png").read_bytes() == base64.b64decode(PNG)
    assert f"saved to {tmp_path / 'call_plot_1-1.png'}" in saved


async def test_an_async_sandbox_is_dispatched_with_adispatch():
    dispatcher = OpenAIToolDispatcher(AsyncFakeSandbox(FakeSandbox()))
    calls = recorded("openai_chat_completion")["choices"][0]["message"]
    assert [answer["content"] for answer in await dispatcher.adispatch_all(calls)][0] == "set\n42\n"
    await dispatcher.aclose()


# --- against a real code server ---------------------------------------------------------------------------------
async def test_recorded_calls_run_on_a_real_code_interpreter_sandbox(code_installation):
    caller = await tenant_caller(code_installation, f"oai-{code_installation.node}")
    gateway = await code_installation.address("gateway")

    def conversation() -> list[str]:
        with Client(gateway, caller.key) as client, Sandbox.create("code-interpreter", client=client) as sandbox:
            dispatcher = OpenAIToolDispatcher(sandbox)
            message = recorded("openai_chat_completion")["choices"][0]["message"]
            answers = [answer["content"] for answer in dispatcher.dispatch_all(message)]
            answers += [answer["output"] for answer in dispatcher.dispatch_all(recorded("openai_responses")["output"])]
            dispatcher.close()
            return answers

    ran, wrote, listed, executed, missing = await asyncio.to_thread(conversation)
    assert ran == "set\n42\n" and wrote == "wrote 6 bytes to /home/user/notes.txt" and "notes.txt  6 bytes" in listed
    assert executed == "error:\nout\nerr\n[exit code 3]\n"
    assert missing.startswith("error: read_file: NOT_FOUND")
