"""The computer-use executors against recorded vendor payloads (tests/unit/data/integrations/*computer*.json, as dicts
and as the SDKs' attribute objects) on a fake desktop held to the SDK's `Desktop` signatures: each action becomes the
desktop calls it means, each answer has the vendor's shape with a base64 PNG, and a bad action becomes an error the
model can read, never an exception. No network."""

from __future__ import annotations

import asyncio
import base64
import inspect
from types import SimpleNamespace

import pytest

from microvm_integrations.computer_use import AnthropicComputerExecutor, OpenAIComputerExecutor, openai_keys
from microvm_sandbox import Desktop
from microvm_sandbox.errors import DesktopMissing
from tests.unit.data.integrations.fake_desktop import AsyncFakeDesktop, FakeDesktop
from tests.unit.data.integrations.fake_sandbox import PNG, as_objects, recorded

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def actions(desktop) -> list[tuple]:
    """What the executor did to the desktop, without the screenshots and settling waits around each action."""
    return [call for call in desktop.calls if call[0] not in ("screenshot", "wait_until_stable")]


def test_the_fake_desktop_has_the_sdks_signatures():
    for name, member in vars(Desktop).items():
        if name.startswith("_") or not callable(member) or name in ("record", "stop_recording", "stream_url"):
            continue
        theirs = list(inspect.signature(member).parameters)
        assert list(inspect.signature(getattr(FakeDesktop, name)).parameters) == theirs, name


# --- Anthropic ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [dict, as_objects])
def test_a_recorded_message_becomes_desktop_actions_answered_with_screenshots(shape):
    desktop = FakeDesktop()
    results = AnthropicComputerExecutor(SimpleNamespace(desktop=desktop)).execute_all(
        shape(recorded("anthropic_computer_message"))
    )
    assert actions(desktop) == [
        ("left_click", (512, 44)),
        ("press", ["ctrl+l"]),
        ("write", "microvm sandboxes\n"),
        ("scroll", "down", 5, (512, 400)),
        ("drag", (100, 200), (300, 220)),
        ("double_click", (240, 310)),
        ("left_click", (240, 310)),
    ]
    assert len(results) == 8  # the text editor's block is left to its own dispatcher
    assert results[1]["tool_use_id"] == "toolu_01Mv9Ek2pQw7Tz5Ba3Nc6Hyf"
    for result in results[:7]:
        assert result["type"] == "tool_result" and result["is_error"] is False
        [image] = result["content"]
        assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
        assert base64.b64decode(image["source"]["data"]).startswith(PNG_SIGNATURE)
    assert results[7]["content"] == [{"type": "text", "text": "X=240,Y=310"}]


def test_the_tool_definition_carries_the_screen_size_and_the_version():
    executor = AnthropicComputerExecutor(FakeDesktop(), version="computer_20241022")
    assert executor.tool() == {
        "type": "computer_20241022",
        "name": "computer",
        "display_width_px": 1024,
        "display_height_px": 768,
    }


def test_bad_actions_become_error_results_naming_the_problem():
    desktop = FakeDesktop()
    executor = AnthropicComputerExecutor(desktop)
    results = [executor.execute(block) for block in recorded("bad_computer_actions")["anthropic"]]
    assert all(result["is_error"] and result["type"] == "tool_result" for result in results)
    texts = [result["content"][0]["text"] for result in results]
    assert texts[0] == "error: unknown action 'teleport'"
    assert "coordinate must be [x, y]" in texts[1]
    assert "mouse_move needs `coordinate`" in texts[2]
    assert "type needs `text`" in texts[3]
    assert texts[4].startswith("error: INVALID_ARGUMENT: unknown key 'frobnicate'; valid: ") and "return" in texts[4]
    assert "OFF_SCREEN" not in texts[5] and "off the 1024x768 screen" in texts[5]
    assert "scroll_direction" in texts[6]
    assert "hold_key is not supported" in texts[7]
    assert "without a left_mouse_down" in texts[8]
    assert texts[9] == "error: unknown action None"
    assert actions(desktop) == []


def test_mouse_down_then_up_elsewhere_drags_and_in_place_clicks():
    desktop = FakeDesktop()
    executor = AnthropicComputerExecutor(desktop, settle=0)
    for action in (
        {"action": "left_mouse_down", "coordinate": [10, 10]},
        {"action": "mouse_move", "coordinate": [50, 60]},
        {"action": "left_mouse_up"},
        {"action": "left_mouse_down"},
        {"action": "left_mouse_up"},
    ):
        assert not executor.execute({"type": "tool_use", "id": "t", "name": "computer", "input": action})["is_error"]
    assert actions(desktop) == [("move", (50, 60)), ("drag", (10, 10), (50, 60)), ("left_click", (50, 60))]
    assert not any(call[0] == "wait_until_stable" for call in desktop.calls)  # settle=0: no waiting


def test_a_sandbox_without_a_display_is_an_error_result():
    class NoDisplay(FakeDesktop):
        def screenshot(self, region=None, scale=None, path=None):
            raise DesktopMissing("the sandbox has no display", code="FAILED_PRECONDITION", reason="DESKTOP_MISSING")

    result = AnthropicComputerExecutor(NoDisplay()).execute({"id": "t", "input": {"action": "screenshot"}})
    assert result["is_error"] and "FAILED_PRECONDITION: the sandbox has no display" in result["content"][0]["text"]


def test_the_async_executor_drives_an_async_desktop():
    desktop = AsyncFakeDesktop()
    executor = AnthropicComputerExecutor(desktop)
    message = recorded("anthropic_computer_message")
    results = asyncio.run(executor.aexecute_all(message))
    assert len(results) == 8 and actions(desktop)[0] == ("left_click", (512, 44))
    with pytest.raises(TypeError, match="asynchronous"):
        executor.execute(message["content"][1])


# --- OpenAI -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [dict, as_objects])
def test_recorded_computer_calls_become_actions_answered_with_screenshot_outputs(shape):
    desktop = FakeDesktop()
    executor = OpenAIComputerExecutor(desktop)
    outputs = executor.execute_all(shape(recorded("openai_computer_response")))
    assert actions(desktop) == [
        ("left_click", (156, 320)),
        ("write", "penguin"),
        ("press", ["CTRL+a"]),
        ("scroll", "up", 3, (512, 400)),
        ("drag", (10, 20), (90, 120)),
    ]
    assert [output["call_id"] for output in outputs] == [
        "call_Zk3Yq8Wm2Lp5Rt7Vx9Bn4Hc1",
        "call_Qw4Er6Ty8Ui0Op2As4Df6Gh8",
        "call_Jk2Lz4Xc6Vb8Nm0Qa2Ws4Ed6",
        "call_Rf5Tg7Yh9Uj1Ik3Ol5Pz7Xc9",
        "call_Vb8Nm1Qa3Ws5Ed7Rf9Tg1Yh3",
        "call_Ty2Ui4Op6As8Df0Gh2Jk4Lz6",
    ]
    for output in outputs:
        assert set(output) == {"type", "call_id", "output"} and output["type"] == "computer_call_output"
        assert output["output"] == {"type": "computer_screenshot", "image_url": f"data:image/png;base64,{PNG}"}
    assert executor.last_error is None


def test_keypress_keys_become_one_combination_the_desktop_knows():
    assert openai_keys(["CTRL", "SHIFT", "T"]) == "CTRL+SHIFT+t"
    assert openai_keys(["ctrl", "+"]) == "ctrl+plus"
    assert openai_keys(["ENTER"]) == "ENTER"


def test_bad_calls_still_answer_a_screenshot_and_say_why_after_the_outputs():
    desktop = FakeDesktop()
    executor = OpenAIComputerExecutor(desktop)
    calls = recorded("bad_computer_actions")["openai"]
    answers = executor.execute_all(calls)
    outputs, [note] = answers[:-1], answers[-1:]
    assert [output["call_id"] for output in outputs] == [call["call_id"] for call in calls]
    assert all(output["output"]["image_url"].startswith("data:image/png;base64,") for output in outputs)
    assert note["role"] == "user"
    lines = note["content"].splitlines()
    assert len(lines) == len(calls)
    assert "call_bad_1 failed: unknown action 'teleport'" in lines[0]
    assert "'back' button is not supported" in lines[1]
    assert "two non-negative integers" in lines[2]
    assert "at least two points" in lines[3]
    assert "INVALID_ARGUMENT: unknown key 'FROB'" in lines[4]
    assert "off the 1024x768 screen" in lines[5]
    assert "unknown action None" in lines[6]
    assert actions(desktop) == []


def test_unacknowledged_safety_checks_stop_the_action_and_acknowledged_ones_are_returned():
    check = {"id": "cu_sc_1", "code": "malicious_instructions", "message": "The page asks to do something else."}
    call = {"type": "computer_call", "call_id": "c1", "action": {"type": "type", "text": "x"}}
    call["pending_safety_checks"] = [check]
    desktop = FakeDesktop()
    refused = OpenAIComputerExecutor(desktop).execute(call)
    assert "acknowledged_safety_checks" not in refused and actions(desktop) == []
    accepted = OpenAIComputerExecutor(desktop, acknowledge=lambda c: c["code"] == "malicious_instructions").execute(
        call
    )
    assert accepted["acknowledged_safety_checks"] == [check] and actions(desktop) == [("write", "x")]


def test_the_openai_tool_definition_carries_the_screen_size():
    assert OpenAIComputerExecutor(FakeDesktop()).tool() == {
        "type": "computer_use_preview",
        "display_width": 1024,
        "display_height": 768,
        "environment": "linux",
    }
