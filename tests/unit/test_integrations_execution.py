"""The integrations' shared core (microvm_integrations.execution and .tools): code contexts kept per language and
made again when gone, the fallback to processes where no kernel is, and runs told as a model reads them; against
a fake sandbox with the SDK's surface (tests/unit/data/integrations/fake_sandbox.py)."""

from __future__ import annotations

import pytest

from microvm_integrations.execution import CodeSession, exec_outcome, execution_outcome, run_sync
from microvm_integrations.tools import SandboxTools, check_arguments, parse_arguments, tool_specs
from microvm_sandbox.errors import InvalidArgumentError
from microvm_sandbox.models import ExecResult
from tests.unit.data.integrations.fake_sandbox import AsyncFakeSandbox, Execution, ExecutionError, FakeSandbox, Result


def run(session: CodeSession, code: str, language: str = "python"):
    return run_sync(session.run(code, language))


def test_a_session_keeps_state_in_a_context_of_its_own_per_language():
    sandbox = FakeSandbox()
    first, second = CodeSession(sandbox), CodeSession(sandbox)
    assert run(first, "x = 41").text == ""
    assert run(first, "print('hi')\nx + 1").text == "hi\n42\n"
    assert run(second, "x").is_error  # another session's context never sees x
    assert [call for call in sandbox.calls if call[0] == "create_code_context"] == [
        ("create_code_context", "python")
    ] * 2


def test_a_deleted_context_is_made_again_and_the_run_goes_through():
    sandbox = FakeSandbox()
    session = CodeSession(sandbox)
    run(session, "x = 1")
    sandbox.delete_code_context(session.contexts["python"])
    outcome = run(session, "y = 2\ny")
    assert outcome.text == "2\n" and not outcome.is_error
    assert run(session, "x").is_error  # the new context starts empty, as a new kernel does


def test_a_language_without_a_kernel_runs_as_a_process_and_is_not_asked_for_again():
    sandbox = FakeSandbox(kernels=("python",))
    session = CodeSession(sandbox)
    assert run(session, "echo $((6*7))", "sh").text == "42\n"
    failed = run(session, "echo no >&2; exit 3", "bash")
    assert (failed.exit_code, failed.is_error, failed.text) == (3, True, "no\n[exit code 3]\n")
    creates = [call for call in sandbox.calls if call[0] == "create_code_context"]
    assert creates == [("create_code_context", "bash")]  # sh, shell and bash are one kernel language
    with pytest.raises(InvalidArgumentError):
        run(session, "x", "cobol")


def test_an_error_is_its_traceback_without_colours_and_the_next_run_still_works():
    session = CodeSession(FakeSandbox())
    outcome = run(session, "1 / 0")
    assert outcome.is_error and outcome.exit_code == 1
    assert "ZeroDivisionError: division by zero" in outcome.text and "\x1b[" not in outcome.text
    assert run(session, "2 + 2").text == "4\n"


def test_a_dead_kernel_is_said_and_so_is_the_fresh_one_of_the_next_run():
    session = CodeSession(FakeSandbox())
    run(session, "x = 1")
    died = run(session, "die()")
    assert died.is_error and "kernel died" in died.text
    after = run(session, "x")
    assert after.text.startswith("[the kernel had died and was restarted") and "NameError" in after.text


def test_results_become_text_images_and_chart_data():
    png = "iVBORw0KGgo="
    execution = Execution(
        results=[
            Result(text="<Figure>", png=png, chart={"type": "bar", "elements": [{"label": "a", "value": 3}]}),
            Result(html="<b>only html</b>"),
            Result(is_main_result=True, text="42"),
        ],
        status="timeout",
    )
    outcome = execution_outcome(execution)
    assert [(image.media_type, image.data) for image in outcome.images] == [("image/png", png)]
    assert '"type": "bar"' in outcome.text and "<b>only html</b>" in outcome.text and "42\n" in outcome.text
    assert outcome.exit_code == 124 and "timed out" in outcome.text
    failed = execution_outcome(Execution(error=ExecutionError("ValueError", "bad", ""), status="error"))
    assert failed.text == "ValueError: bad\n" and failed.is_error


def test_output_beyond_the_bound_is_cut_with_a_note():
    outcome = execution_outcome(Execution(results=[Result(is_main_result=True, text="x" * 50_000)]))
    assert len(outcome.text) < 20_100 and "more characters not shown" in outcome.text


def test_a_sync_call_on_an_async_sandbox_says_which_method_to_use():
    with pytest.raises(TypeError, match="async"):
        SandboxTools(AsyncFakeSandbox(FakeSandbox())).call("run_code", {"code": "1"})


async def test_the_tools_run_on_an_async_sandbox_too():
    tools = SandboxTools(AsyncFakeSandbox(FakeSandbox()))
    assert (await tools.acall("run_code", '{"code": "x = 20"}')).text == ""
    assert (await tools.acall("run_code", {"code": "x + 22"})).text == "42\n"
    assert (await tools.acall("exec", {"command": "echo hi"})).text == "hi\n"
    await tools.aclose()
    assert tools.session.contexts == {}


def test_arguments_are_checked_against_the_schema_in_words_for_the_model():
    run_code = tool_specs(["run_code"])[0]
    assert parse_arguments("") == {} and parse_arguments({"a": 1}) == {"a": 1}
    for raw, words in (("{", "not valid JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(ValueError, match=words):
            parse_arguments(raw)
    for arguments, words in (
        ({}, "missing required argument `code`"),
        ({"code": "1", "lang": "py"}, "unknown argument `lang`"),
        ({"code": 1}, "`code` must be a string"),
        ({"code": True}, "`code` must be a string"),
    ):
        with pytest.raises(ValueError, match=words):
            check_arguments(run_code, arguments)


def test_files_are_read_as_text_images_or_a_note_for_binary():
    sandbox = FakeSandbox()
    tools = SandboxTools(sandbox, max_read_chars=10)
    sandbox.files.update(
        {"/a.txt": b"hello", "/big.txt": b"y" * 30, "/b.bin": b"\x00\xff\xfe", "/c.png": b"\x89PNG\r\n\x1a\n..."}
    )
    assert tools.call("read_file", {"path": "/a.txt"}).text == "hello"
    assert "20 more characters" in tools.call("read_file", {"path": "/big.txt"}).text
    assert "binary file of 3 bytes" in tools.call("read_file", {"path": "/b.bin"}).text
    assert tools.call("read_file", {"path": "/c.png"}).images[0].media_type == "image/png"
    missing = tools.call("read_file", {"path": "/nope"})
    assert missing.is_error and missing.text == "error: read_file: NOT_FOUND: /nope: no such file or directory"


def test_a_process_that_was_killed_or_timed_out_says_so():
    killed = exec_outcome(ExecResult(b"", b"", None, 9))
    assert (killed.exit_code, killed.text) == (137, "[killed by signal 9]\n")
    late = exec_outcome(ExecResult(b"part", b"", None, 9, timed_out=True, truncated=True, output_bytes=99))
    assert late.exit_code == 124 and "timed out" in late.text and "99 bytes written" in late.text
