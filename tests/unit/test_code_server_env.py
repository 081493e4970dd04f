"""A run's `env` of the code server: set for that run only, in Python kernels, bash shells and Node.js processes; the
context's earlier values come back afterwards (new names are unset again), also after an error or a timeout."""

import shutil

import pytest

from tests.code_server import host_code_server, of_type, request, run, text
from tests.unit.test_code_server_languages import new_context

pytest.importorskip("ipykernel", reason="ipykernel is in requirements.lock: run make venv")
pytestmark = pytest.mark.timeout(120)

RUN_ENV = {"MVM_OLD": "for this run", "MVM_NEW": "new value"}


@pytest.fixture(scope="module")
def code_socket(tmp_path_factory):
    with host_code_server(tmp_path_factory.mktemp("code-server-env")) as socket_path:
        yield str(socket_path)


PRINT = {
    "python": "import os; print(os.environ.get('MVM_OLD'), os.environ.get('MVM_NEW'))",
    "bash": 'echo "${MVM_OLD-None}" "${MVM_NEW-None}"; sh -c \'echo "$MVM_NEW"\'',
    "javascript": "console.log(process.env.MVM_OLD ?? 'None', process.env.MVM_NEW ?? 'None')",
}
FAIL = {"python": "raise RuntimeError('fails')", "bash": "false", "javascript": "throw new Error('fails')"}
HANG = {"python": "import time; time.sleep(60)", "bash": "sleep 60", "javascript": "while (true) {}"}
LANGUAGES = ["python", "bash"] + (["javascript"] if shutil.which("node") else [])


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_runs_env_is_seen_by_that_run_and_restored_after_it(code_socket, language):
    context = await new_context(code_socket, language, env={"MVM_OLD": "context value"})
    events = await run(code_socket, PRINT[language], context=context, env=RUN_ENV)
    child = language == "bash"  # bash also shows that the variables are exported, to a child process
    assert text(events) == "for this run new value\n" + ("new value\n" if child else "")
    assert events[-1]["status"] == "ok"
    restored = "context value None\n" + ("\n" if child else "")
    assert text(await run(code_socket, PRINT[language], context=context)) == restored

    for code, status in ((FAIL[language], "error"), (HANG[language], "timeout")):
        events = await run(code_socket, code, context=context, env=RUN_ENV, timeout=1)
        assert events[-1]["status"] == status, events
        assert text(await run(code_socket, PRINT[language], context=context)) == restored, code
    await request(code_socket, {"op": "delete_context", "context": context})


async def test_python_env_changes_do_not_show_in_the_execution_count(code_socket):
    first = (await run(code_socket, "1"))[-1]["execution_count"]
    assert (await run(code_socket, "2", env=RUN_ENV))[-1]["execution_count"] == first + 1
    assert (await run(code_socket, "3"))[-1]["execution_count"] == first + 2


async def test_a_name_the_code_set_itself_is_put_back_to_the_value_before_the_run(code_socket):
    context = await new_context(code_socket, "bash")
    events = await run(code_socket, "export MVM_NEW=changed-by-code", context=context, env={"MVM_NEW": "x"})
    assert events[-1]["status"] == "ok"
    assert text(await run(code_socket, 'echo "${MVM_NEW-unset}"', context=context)) == "unset\n"


@pytest.mark.parametrize(
    "env, language",
    [
        ({"": "x"}, "python"),
        ({"A=B": "x"}, "python"),
        ({"A\0": "x"}, "python"),
        ({"A": 1}, "python"),
        ({"A": "x\0y"}, "python"),
        ({f"V{i}": "x" for i in range(257)}, "python"),
        (["A", "x"], "python"),
        ({"NOT-A-NAME": "x"}, "bash"),
    ],
)
async def test_a_bad_env_is_refused_before_anything_runs(code_socket, env, language):
    [refused] = await run(code_socket, "print('ran')", language=language, env=env)
    assert refused["refused"] is True and refused["name"] == "bad_request", refused
    assert of_type(await run(code_socket, "echo fine", language="bash", env={"OK": "1"}), "stdout")
