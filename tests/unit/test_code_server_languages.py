"""The code server's bash and javascript contexts, run on this host against a real bash and a real node (the
guest has Debian's): state persists between runs, output, errors, timeouts and interrupts keep the process and its
state, a process that dies is replaced on the next run."""

import asyncio
import shutil

import pytest

from tests.code_server import host_code_server, of_type, request, run, text

pytest.importorskip("ipykernel", reason="ipykernel is in requirements.lock: run make venv")
pytestmark = pytest.mark.timeout(120)
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed on this host")


@pytest.fixture(scope="module")
def code_socket(tmp_path_factory):
    with host_code_server(tmp_path_factory.mktemp("code-server-languages")) as socket_path:
        yield str(socket_path)


async def new_context(socket_path: str, language: str, **fields) -> str:
    [reply] = await request(socket_path, {"op": "create_context", "language": language, **fields})
    assert reply["type"] == "context", reply
    return reply["context"]["id"]


async def test_bash_variables_functions_and_the_working_directory_persist(code_socket, tmp_path):
    (tmp_path / "sub").mkdir()
    context = await new_context(code_socket, "bash", cwd=str(tmp_path))
    events = await run(code_socket, 'x=41\ngreet() { echo "hello $1"; }\ncd sub', context=context)
    assert events[-1] == {"type": "end", "execution_count": 1, "status": "ok"}
    events = await run(code_socket, 'echo $((x + 1)) "$(greet you)" "$PWD"', context=context)
    assert text(events) == f"42 hello you {tmp_path / 'sub'}\n"
    assert events[-1]["status"] == "ok" and events[-1]["execution_count"] == 2


async def test_bash_stderr_is_separate_and_a_failing_last_command_is_an_error(code_socket):
    events = await run(code_socket, "echo out; echo err >&2; false; echo still", language="bash")
    assert (text(events), text(events, "stderr")) == ("out\nstill\n", "err\n")
    assert events[-1]["status"] == "ok" and not of_type(events, "error")
    events = await run(code_socket, "echo before\n(exit 3)", language="bash")
    assert text(events) == "before\n"
    [error] = of_type(events, "error")
    assert (error["name"], error["value"]) == ("CommandFailed", "exit status 3")
    assert events[-1]["status"] == "error"
    assert text(await run(code_socket, "echo next", language="bash")) == "next\n"


async def test_bash_timeout_interrupts_the_foreground_command_and_keeps_the_shell(code_socket):
    context = await new_context(code_socket, "bash")
    await run(code_socket, "kept='still here'", context=context)
    events = await run(code_socket, "echo before\nsleep 100\necho not reached", context=context, timeout=1)
    assert events[-1]["status"] == "timeout"
    assert text(events) == "before\n"
    assert [error["name"] for error in of_type(events, "error")] == ["TimeoutError"]
    events = await run(code_socket, 'echo "$kept"', context=context)
    assert text(events) == "still here\n" and "restarted" not in events[-1]
    # the shell can be interrupted again: bash would otherwise ignore the second SIGINT after a trap returned
    events = await run(code_socket, "while true; do :; done", context=context, timeout=1)
    assert events[-1]["status"] == "timeout"
    assert text(await run(code_socket, 'echo "$kept"', context=context)) == "still here\n"


async def test_bash_interrupt_from_another_connection_ends_the_run_and_keeps_state(code_socket):
    context = await new_context(code_socket, "bash")
    await run(code_socket, "kept=7", context=context)
    running = asyncio.ensure_future(run(code_socket, "sleep 100\necho not reached", context=context))
    while not running.done():  # until one SIGINT came while `sleep` ran (one sent before it started is lost)
        await asyncio.sleep(0.5)
        [reply] = await request(code_socket, {"op": "interrupt", "context": context})
        assert reply == {"type": "interrupted", "context": context}
    events = running.result()
    assert [error["name"] for error in of_type(events, "error")] == ["Interrupted"]
    assert events[-1]["status"] == "error" and text(events) == ""
    assert text(await run(code_socket, "echo $kept", context=context)) == "7\n"


async def test_bash_output_and_code_that_look_like_the_end_marker_do_not_end_the_run(code_socket):
    fake = "MVM-END-" + "0" * 32
    code = f"echo '{fake} 0'\necho '{fake}' >&2\ncat <<'EOF'\n{fake} 1\nEOF\nprintf 'no newline'\necho; echo after"
    events = await run(code_socket, code, language="bash")
    assert text(events) == f"{fake} 0\n{fake} 1\nno newline\nafter\n"
    assert text(events, "stderr") == f"{fake}\n"
    assert events[-1]["status"] == "ok"


async def test_bash_code_cannot_read_the_servers_input(code_socket):
    events = await run(code_socket, 'read -r line; echo "read: [$line] $?"; cat; echo done', language="bash")
    assert text(events) == "read: [] 1\ndone\n"
    assert text(await run(code_socket, "echo next", language="bash")) == "next\n"


async def test_a_bash_shell_that_exits_ends_the_run_and_the_next_run_gets_a_fresh_shell(code_socket):
    context = await new_context(code_socket, "bash")
    await run(code_socket, "lost=1", context=context)
    events = await run(code_socket, "echo bye; exit 3", context=context)
    assert text(events) == "bye\n" and events[-1]["status"] == "kernel_died"
    [error] = of_type(events, "error")
    assert error["name"] == "KernelDied" and context in error["value"] and "exit code 3" in error["value"]
    events = await run(code_socket, 'echo "${lost-unset}"', context=context)
    assert text(events) == "unset\n"
    assert events[-1] == {"type": "end", "execution_count": 1, "status": "ok", "restarted": True}


async def test_bash_restart_and_delete(code_socket):
    context = await new_context(code_socket, "bash")
    await run(code_socket, "gone=yes", context=context)
    [reply] = await request(code_socket, {"op": "restart_context", "context": context})
    assert reply["context"] == {**reply["context"], "id": context, "language": "bash"}
    assert text(await run(code_socket, 'echo "${gone-unset}"', context=context)) == "unset\n"
    assert (await request(code_socket, {"op": "delete_context", "context": context}))[0]["type"] == "deleted"
    [refused] = await run(code_socket, "echo", context=context)
    assert refused["name"] == "context_not_found"


@needs_node
async def test_javascript_declarations_persist_between_runs(code_socket):
    context = await new_context(code_socket, "javascript")
    events = await run(
        code_socket,
        "var v = 1; let l = 2; const c = 3; function f(n) { return n * 10 }; class K { get k() { return 4 } }",
        context=context,
    )
    assert events[-1]["status"] == "ok" and not of_type(events, "result")
    await run(code_socket, "const awaited = await Promise.resolve(5)", context=context)
    events = await run(code_socket, "[v, l, c, f(1), new K().k, awaited]", context=context)
    assert of_type(events, "result")[0]["data"]["application/json"] == [1, 2, 3, 10, 4, 5]
    events = await run(code_socket, "v = 100; l += 1; l", context=context)
    assert of_type(events, "result")[0]["data"]["text/plain"] == "3"
    assert events[-1]["execution_count"] == 4


@needs_node
async def test_javascript_console_output_and_the_last_expression_as_text_and_json(code_socket):
    events = await run(
        code_socket,
        "console.log('out', 1); console.error('err'); ({ name: 'x', list: [1, 'two', null] })",
        language="js",
    )
    assert (text(events), text(events, "stderr")) == ("out 1\n", "err\n")
    [result] = of_type(events, "result")
    assert result["is_main_result"] is True
    assert result["data"]["text/plain"] == "{ name: 'x', list: [ 1, 'two', null ] }"
    assert result["data"]["application/json"] == {"name": "x", "list": [1, "two", None]}
    [result] = of_type(await run(code_socket, "new Map([['a', 1]])", language="js"), "result")
    assert result["data"] == {"text/plain": "Map(1) { 'a' => 1 }"}, "a Map is not plain JSON"
    assert not of_type(await run(code_socket, "undefined", language="js"), "result")


@needs_node
async def test_javascript_thrown_error_gives_name_value_stack_and_the_next_run_works(code_socket):
    events = await run(code_socket, "function bad() { throw new TypeError('no good') }\nbad()", language="javascript")
    [error] = of_type(events, "error")
    assert (error["name"], error["value"]) == ("TypeError", "no good")
    assert error["traceback"][0] == "TypeError: no good"
    assert any("at bad" in line for line in error["traceback"])
    assert not any("node_driver" in line for line in error["traceback"])
    assert events[-1]["status"] == "error"
    events = await run(code_socket, "await Promise.reject(new RangeError('later'))", language="javascript")
    assert [(e["name"], e["value"]) for e in of_type(events, "error")] == [("RangeError", "later")]
    assert of_type(await run(code_socket, "6 * 7", language="js"), "result")[0]["data"]["text/plain"] == "42"


@needs_node
async def test_javascript_timeout_interrupts_a_busy_loop_or_a_wait_and_keeps_state(code_socket):
    context = await new_context(code_socket, "javascript")
    await run(code_socket, "const kept = 'still here'", context=context)
    for code in ("console.log('before'); while (true) {}", "console.log('before'); await new Promise(() => {})"):
        events = await run(code_socket, code, context=context, timeout=1)
        assert events[-1]["status"] == "timeout", code
        assert text(events) == "before\n"
        assert [error["name"] for error in of_type(events, "error")] == ["TimeoutError"]
        events = await run(code_socket, "kept", context=context)
        assert of_type(events, "result")[0]["data"]["text/plain"] == "'still here'"
        assert "restarted" not in events[-1]


@needs_node
async def test_a_node_process_that_exits_ends_the_run_and_the_next_run_gets_a_fresh_one(code_socket):
    context = await new_context(code_socket, "js")
    await run(code_socket, "var lost = 1", context=context)
    events = await run(code_socket, "process.exit(4)", context=context)
    assert events[-1]["status"] == "kernel_died" and "exit code 4" in of_type(events, "error")[0]["value"]
    events = await run(code_socket, "typeof lost", context=context)
    assert of_type(events, "result")[0]["data"]["text/plain"] == "'undefined'"
    assert events[-1]["restarted"] is True


async def test_languages_are_listed_and_an_unknown_one_is_refused_with_them(code_socket):
    [listed] = await request(code_socket, {"op": "list_contexts"})
    expected = {"python", "bash"} | ({"javascript"} if shutil.which("node") else set())
    assert set(listed["languages"]) == expected
    [refused] = await run(code_socket, "1", language="cobol")
    assert refused["name"] == "unknown_language" and set(refused["languages"]) == expected
    assert "bash" in refused["value"]
    await run(code_socket, "true", language="bash")
    [listed] = await request(code_socket, {"op": "list_contexts"})
    languages = {context["id"]: context["language"] for context in listed["contexts"]}
    assert languages["default"] == "python" and languages["default-bash"] == "bash"
