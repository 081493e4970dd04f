"""The SDK's `Template` builder: a recipe written in code renders to YAML that the builder's own parser
(images.definition, the source of truth) reads back as the same steps, settings and values; files and text are
told apart; a Dockerfile or recipe given as text is kept as given."""

from __future__ import annotations

from pathlib import Path

import pytest

from images.definition import Command, ReadyCheck, Resources, plan_dockerfile, plan_recipe
from microvm_sandbox import InvalidArgumentError, Template

REPO = Path(__file__).resolve().parents[2]


def test_a_recipe_written_in_code_parses_to_the_same_plan(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)")
    (tmp_path / "conf.toml").write_text("x = 1")
    template = (
        Template("web", description="a web app", context=tmp_path)
        .from_template("python:3.12")
        .args({"VERSION": "1.2", "EXTRA": None})
        .env({"LANG": "C.UTF-8", "APP_VERSION": "$VERSION"})
        .apt_install(["curl", "git"])
        .pip_install("requests>=2.31,<3")
        .npm_install(["@scope/tool@^1.2"])
        .workdir("/app")
        .copy(["app/", "conf.toml"], "/app/", chown="1000:1000")
        .run("make install && echo 'done' # not a comment")
        .run(["python3", "-c", "print(1)"])
        .user("nobody")
        .start_cmd("python3 -m http.server 8000", ready_port=8000, ready_timeout=30)
        .resources(vcpus=2, memory_mib=1024)
        .resources(disk_mib=4096)
        .pool_size(2)
    )
    plan = plan_recipe(template.to_recipe(), context=tmp_path, build_args={"VERSION": "2"})
    assert [step.text for step in plan.steps] == [
        "ENV LANG=C.UTF-8 APP_VERSION=2",
        "APT curl git",
        "PIP requests>=2.31,<3",
        "NPM @scope/tool@^1.2",
        "WORKDIR /app",
        "COPY --chown=1000:1000 app/ conf.toml /app/",
        "RUN make install && echo 'done' # not a comment",
        'RUN ["python3","-c","print(1)"]',
        "USER nobody",
    ]
    assert (plan.name, plan.description, plan.pool_size) == ("web", "a web app", 2)
    assert plan.resources == Resources(vcpus=2, memory_mib=1024, disk_mib=4096)
    assert plan.start == Command(shell="python3 -m http.server 8000")
    assert plan.ready == ReadyCheck(port=8000, timeout_seconds=30)
    assert template.source == "recipe" and template.name == "web" and template.definition == template.to_recipe()


def test_steps_keep_the_order_they_were_written_in():
    template = Template().from_template("default").user("agent").run("whoami").user("root").env({"A": "1"})
    plan = plan_recipe(template.to_recipe())
    assert [step.text for step in plan.steps] == ["USER agent", "RUN whoami", "USER root", "ENV A=1"]


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        "1.10",
        "007",
        "null",
        "~",
        "a: b",
        "- x",
        "#x",
        "'q'",
        '"q"',
        "tab\there",
        "é ü 日本",
        "emoji 😀",
        "\u2028",
    ],
)
def test_strings_that_yaml_would_read_otherwise_stay_strings(value):
    template = Template(description=value).from_template("default").env({"V": value}).run(f"echo {value}")
    plan = plan_recipe(template.to_recipe())
    assert plan.env == (("V", value),) and plan.description == value
    assert plan.steps[-1].text == f"RUN echo {value}"


def test_a_ready_command_and_an_exec_form_start():
    template = Template().from_template("default").start_cmd(["sleep", "inf"], ready_cmd="test -e /tmp/up")
    plan = plan_recipe(template.to_recipe())
    assert plan.start == Command(argv=("sleep", "inf"))
    assert plan.ready == ReadyCheck(command=Command(shell="test -e /tmp/up"), timeout_seconds=60)


def test_the_builder_is_immutable_so_a_prefix_can_be_shared():
    base = Template().from_template("python").pip_install(["flask"])
    one, two = base.run("echo one"), base.run("echo two")
    assert "one" not in base.to_recipe() and "two" not in one.to_recipe() and "one" not in two.to_recipe()


def test_mistakes_are_refused_before_anything_is_sent():
    with pytest.raises(InvalidArgumentError, match="from_template"):
        Template().run("x").to_recipe()
    with pytest.raises(InvalidArgumentError, match="not both"):
        Template().from_template("default").start_cmd("x", ready_port=1, ready_cmd="y")
    with pytest.raises(InvalidArgumentError, match="booleans"):
        Template().from_template("default").env({"DEBUG": True}).to_recipe()  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError):
        Template().from_template("default").apt_install([])
    with pytest.raises(InvalidArgumentError, match="Dockerfile"):
        Template.from_dockerfile("FROM default\n").run("x")
    with pytest.raises(InvalidArgumentError):
        Template(dockerfile="FROM default", recipe="from: default")


def test_files_and_text_are_told_apart(tmp_path, monkeypatch):
    (tmp_path / "Dockerfile").write_text("FROM default\nCOPY a /a\n")
    (tmp_path / "mvm.yaml").write_text("name: 'web'  # the name\nfrom: default\n")
    from_path = Template.from_dockerfile(tmp_path / "Dockerfile")
    assert from_path.definition.startswith("FROM default") and from_path.context == tmp_path
    assert Template.from_dockerfile(str(tmp_path)).context == tmp_path  # a directory: its Dockerfile
    from_text = Template.from_dockerfile("FROM default\nRUN true")
    assert from_text.definition == "FROM default\nRUN true" and from_text.context is None
    assert Template.from_dockerfile("FROM default").source == "dockerfile"  # one line with a blank: text
    long_line = "FROM default\nRUN echo " + "x" * 5000
    assert Template.from_dockerfile(long_line).definition == long_line  # not taken for a (too long) file name
    recipe = Template.from_recipe(tmp_path / "mvm.yaml")
    assert (recipe.name, recipe.source, recipe.context) == ("web", "recipe", tmp_path)
    assert Template.from_file(tmp_path / "mvm.yaml").source == "recipe"
    assert Template.from_file(tmp_path / "Dockerfile").source == "dockerfile"
    assert Template.from_recipe(tmp_path / "mvm.yaml", name="other").name == "other"
    with pytest.raises(FileNotFoundError):
        Template.from_dockerfile("Dockerfil")  # one word naming nothing: a missing file, not a definition
    monkeypatch.chdir(tmp_path)
    assert Template().from_template("default").copy("a", "/a").context == tmp_path  # COPY: the current directory
    assert Template().from_template("default").run("x").context is None  # nothing copied: no context


def test_the_builtin_recipes_read_as_templates_keep_their_names():
    for name in ("python", "web"):
        template = Template.from_recipe(REPO / "images" / "templates" / name / "mvm.yaml")
        assert template.name == name and template.context == REPO / "images" / "templates" / name


def test_a_dockerfile_given_as_text_is_sent_as_written():
    text = "FROM default\nARG V=1\nENV V=$V\n"
    template = Template(dockerfile=text)
    assert template.definition == text
    assert plan_dockerfile(template.definition).env == (("V", "1"),)
