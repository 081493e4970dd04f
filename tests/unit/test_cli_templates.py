"""`mvm template` (build, ls, show, rm, logs) and `mvm create --template NAME:TAG` against a fake TemplateService on
a real grpc.aio server (tests/fakes/template_service.py): what is sent, what the terminal shows, exit statuses."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess

import grpc
import pytest

from mvm_cli.completion import bash_script, shapes
from mvm_cli.main import build_parser, parse, run
from tests.fakes.template_service import Script, ScriptedStep, start_fake_gateway

pytestmark = pytest.mark.timeout(60)
STEPS = [
    ScriptedStep("FROM default", cached=True),
    ScriptedStep("RUN make", [b"compiling\n", b"linked"]),  # output whose last line has no newline
    ScriptedStep("COPY app /app"),
]
FAILING = [ScriptedStep("FROM default"), ScriptedStep("RUN make test", [b"ok 1\nnot ok 2\n"], exit_code=2)]


@pytest.fixture
async def mvm(monkeypatch, capfd):
    """`mvm(*argv)` runs the command line (in a thread: the CLI is synchronous) against the fake; returns
    (status, stdout, stderr)."""
    server, address, fake = await start_fake_gateway()
    monkeypatch.setenv("MVM_API_KEY", "test-key")

    async def call(*argv: str) -> tuple[int, str, str]:
        capfd.readouterr()
        status = await asyncio.to_thread(run, ["--gateway", address, *argv])
        out, err = capfd.readouterr()
        return status, out, err

    call.fake = fake
    yield call
    await server.stop(None)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)")
    (tmp_path / "notes.log").write_text("left out")
    (tmp_path / ".mvmignore").write_text("*.log\n")
    (tmp_path / "mvm.yaml").write_text(
        "name: web\nfrom: default\nsteps:\n  - run: make\n  - copy: {src: app, dest: /app}\n"
    )
    (tmp_path / "Dockerfile").write_text("FROM default\nARG V\nRUN make\nCOPY app /app\n")
    return tmp_path


async def test_build_streams_steps_and_output_then_prints_the_build(mvm, project):
    mvm.fake.script = Script(steps=STEPS)
    status, out, err = await mvm("template", "build", "-f", str(project / "mvm.yaml"))
    assert status == 0 and out == "web/b1\n"
    assert err.splitlines() == [
        "building web/b1: 3 steps",
        "[1/3] FROM default (cached)",
        "[2/3] RUN make",
        "  | compiling",
        "  | linked",
        "[2/3] done in 1.5s",
        "[3/3] COPY app /app",
        "[3/3] done in 1.5s",
        err.splitlines()[-1],
    ]
    assert err.splitlines()[-1].startswith("built web/b1 in ") and err.endswith("; tags: latest\n")
    received = mvm.fake.received[-1]
    assert received.spec.template == "templates/web" and received.spec.recipe == (project / "mvm.yaml").read_text()
    assert sorted(received.members()) == [".mvmignore", "Dockerfile", "app", "app/main.py", "mvm.yaml"]


async def test_a_dockerfile_build_takes_name_tags_build_args_and_a_context(mvm, project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("defs") / "web.Dockerfile"
    elsewhere.write_text("FROM default\nARG V\nRUN make\n")
    argv = ["--dockerfile", str(elsewhere), "--name", "web:v1", "-t", "stable", "--build-arg", "V=2", "--no-cache"]
    status, out, err = await mvm("template", "build", *argv, str(project), "-q")
    assert (status, out, err) == (0, "web/b1\n", "")  # -q: no progress
    spec = mvm.fake.received[-1].spec
    assert spec.dockerfile == elsewhere.read_text() and list(spec.tags) == ["v1", "stable"]
    assert dict(spec.build_args) == {"V": "2"} and spec.no_cache
    assert "app/main.py" in mvm.fake.received[-1].members()  # CONTEXT, not the Dockerfile's directory


async def test_without_a_file_the_context_s_recipe_is_built_and_json_is_the_build(mvm, project):
    status, out, _ = await mvm("template", "build", str(project), "--json")
    build = json.loads(out)
    assert (
        status == 0
        and build["name"] == "templates/web/builds/b1"
        and build["state"] == "TEMPLATE_BUILD_STATE_SUCCEEDED"
    )
    assert mvm.fake.received[-1].spec.recipe.startswith("name: web")


async def test_a_failed_build_exits_1_with_the_step_and_its_last_lines(mvm, project):
    mvm.fake.script = Script(steps=FAILING, failure_message="RUN make test exited with 2")
    status, out, err = await mvm("template", "build", "--dockerfile", str(project / "Dockerfile"), "--name", "web")
    assert status == 1 and out == "web/b1\n"
    lines = err.splitlines()
    assert "[2/2] failed with exit code 2 after 1.5s" in lines
    at = lines.index(
        "mvm: template build web/b1 failed at step 2/2 (RUN make test, exit code 2): BUILD_STEP_FAILED: "
        "RUN make test exited with 2"
    )
    assert lines[at + 1 :] == ["mvm: last output of step 2:", "  | ok 1", "  | not ok 2"]
    status, _, quiet = await mvm("template", "build", "--dockerfile", str(project / "Dockerfile"), "--name", "w", "-q")
    assert status == 1 and quiet.splitlines()[-2:] == ["  | ok 1", "  | not ok 2"]  # shown even when quiet


@pytest.mark.parametrize(
    "argv, words, expected",
    [
        (["--dockerfile", "{p}/Dockerfile"], "name the template: --name", 2),
        (["-f", "{p}/missing.yaml"], "No such file or directory", 2),
        (["{p}/app"], "no mvm.yaml or Dockerfile in", 2),
        (["-f", "{p}/mvm.yaml", "{p}/nothere"], "is not a directory", 1),
    ],
)
async def test_build_mistakes_are_one_line_errors(mvm, project, argv, words, expected):
    status, out, err = await mvm("template", "build", *[a.replace("{p}", str(project)) for a in argv])
    assert status == expected and out == "" and len(err.splitlines()) == 1 and err.startswith("mvm: ")
    assert words in err, err


async def test_a_definition_the_builder_refuses_is_reported_with_its_reason(mvm, project):
    mvm.fake.script = Script(refuse=(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECIPE", "steps[0].run: is empty"))
    status, out, err = await mvm("template", "build", str(project))
    assert (status, out) == (1, "") and err == "mvm: INVALID_ARGUMENT: steps[0].run: is empty\n"


async def test_ls_show_and_the_old_templates_command(mvm, project):
    mvm.fake.script = Script(steps=STEPS)
    await mvm("template", "build", str(project), "-q")
    await mvm("template", "build", str(project), "--name", "web:v2", "-q")
    status, out, _ = await mvm("template", "ls")
    assert status == 0 and [line.split()[:3] for line in out.splitlines()] == [
        ["TEMPLATE", "TAGS", "OWNER"],
        ["default", "-", "builtin"],
        ["web", "latest,v2", "public"],
    ]
    assert (await mvm("templates", "-q"))[1] == (await mvm("template", "ls", "-q"))[1] == "default\nweb\n"
    assert [t["name"] for t in json.loads((await mvm("templates", "--json"))[1])] == [
        "templates/default",
        "templates/web",
    ]
    status, out, _ = await mvm("template", "show", "web")
    view = dict(line.split(":", 1) for line in out.split("\n\n")[0].splitlines())
    assert status == 0 and view["tags"].strip() == "latest=b1,v2=b2" and view["pool size"].strip() == "default"
    builds = out.split("\n\n")[1].splitlines()
    assert builds[0].split()[:3] == ["BUILD", "STATE", "TAGS"] and [b.split()[0] for b in builds[1:]] == ["b2", "b1"]
    shown = json.loads((await mvm("template", "show", "web", "--json", "--builds", "1"))[1])
    assert shown["template"]["name"] == "templates/web" and [b["name"] for b in shown["builds"]] == [
        "templates/web/builds/b2"
    ]
    status, _, err = await mvm("template", "show", "nope")
    assert status == 2 and err.startswith("mvm: NOT_FOUND: ")


async def test_rm_needs_force_while_in_use_and_reports_each_template(mvm, project):
    await mvm("template", "build", str(project), "-q")
    mvm.fake.in_use.add("templates/web")
    status, out, err = await mvm("template", "rm", "web")
    assert status == 1 and out == "" and "(--force deletes it anyway)" in err and "TEMPLATE" not in out
    status, out, err = await mvm("template", "rm", "web", "nope", "--force")
    assert status == 2 and out == "deleted web\n"  # 2: every failure was NOT_FOUND
    assert err.splitlines() == [err.splitlines()[0], "mvm: template rm: 1 of 2 templates failed"]
    assert err.startswith("mvm: template rm nope: NOT_FOUND")
    assert mvm.fake.deleted == [("templates/web", True)]


async def test_logs_of_the_newest_build_a_tag_or_one_build_and_follow(mvm, project):
    mvm.fake.script = Script(steps=STEPS)
    await mvm("template", "build", str(project), "-q")
    mvm.fake.script = Script(steps=FAILING)
    await mvm("template", "build", str(project), "--name", "web:v2", "-q")
    assert await mvm("template", "logs", "web") == (0, "ok 1\nnot ok 2\n", "")  # the newest build
    assert await mvm("template", "logs", "web:latest") == (0, "compiling\nlinked", "")
    assert await mvm("template", "logs", "web/b1") == (0, "compiling\nlinked", "")
    status, out, err = await mvm("template", "logs", "web/b1", "--follow")
    assert (status, out, err) == (0, "compiling\nlinked", "mvm: build web/b1 succeeded\n")
    status, out, err = await mvm("template", "logs", "web", "-f")
    assert status == 1 and out == "ok 1\nnot ok 2\n" and "failed at step 2" in err
    status, _, err = await mvm("template", "logs", "web:nope")
    assert status == 2 and "no tag 'nope'" in err


async def test_create_takes_a_template_with_a_tag_and_shows_its_build(mvm, project):
    await mvm("template", "build", str(project), "--name", "web:v1", "-q")
    status, out, _ = await mvm("create", "--template", "web:v1", "--json")
    assert status == 0 and json.loads(out)["templateBuild"] == "templates/web/builds/b1"
    assert mvm.fake.sandboxes.created[-1].sandbox.template == "web:v1"
    status, _, err = await mvm("create", "--template", "web:nope")
    assert status == 2 and err.startswith("mvm: NOT_FOUND") and "web:nope" in err


def test_parsing_and_completion_of_the_template_commands():
    args = parse(["template", "build", "-f", "mvm.yaml", "ctx", "--build-arg", "A=1", "--build-arg", "B=2", "-t", "x"])
    assert (args.file, args.context, args.build_arg, args.tag) == ("mvm.yaml", "ctx", ["A=1", "B=2"], ["x"])
    with pytest.raises(SystemExit):
        parse(["template", "build", "-f", "a.yaml", "--dockerfile", "Dockerfile"])
    assert parse(["template", "rm", "a", "b", "--force"]).templates == ["a", "b"]
    assert parse(["templates"]).handler == parse(["template", "ls"]).handler
    found = shapes(build_parser())
    assert found["mvm template show"].positionals == "template" and found["mvm template rm"].positionals == "templates"
    if shutil.which("bash") is None:
        return
    program = (
        bash_script(build_parser())
        + 'mvm() { case "$*" in "template ls -q") echo web tools ;; esac; }\n'
        + "COMP_WORDS=(mvm template rm web '')\nCOMP_CWORD=4\n"
        + '_mvm mvm "" web\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["web", "tools"], result.stderr
    program = program.replace(
        "COMP_WORDS=(mvm template rm web '')\nCOMP_CWORD=4", "COMP_WORDS=(mvm template '')\nCOMP_CWORD=2"
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["build", "ls", "list", "show", "rm", "delete", "logs", "tag", "untag"], (
        shlex.quote(result.stderr)
    )
