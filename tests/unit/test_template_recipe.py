"""The YAML recipe (mvm.yaml) of template definitions: the same steps as a Dockerfile and the same plan, plus
package lists, resources, start, ready, pool size; every refusal names its key path. Also parses the built-in
recipes in images/templates (without building them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from images.definition import (
    Command,
    DefinitionError,
    PackagesStep,
    ReadyCheck,
    Resources,
    load_plan,
    plan_dockerfile,
    plan_recipe,
)

REPO = Path(__file__).resolve().parents[2]


def refused(text: str, context: Path | None = None, **kwargs) -> DefinitionError:
    with pytest.raises(DefinitionError) as caught:
        plan_recipe(text, context, **kwargs)
    return caught.value


def test_a_recipe_and_a_dockerfile_saying_the_same_make_the_same_steps(tmp_path):
    (tmp_path / "app.py").write_text("print(1)\n")
    recipe = plan_recipe(
        """
from: default
args: {PORT: "8000"}
env: {PORT: "${PORT}", MODE: prod}
workdir: /srv
steps:
  - copy: {src: app.py, dest: ./, chown: "1000:1000"}
  - run: python3 app.py
  - run: [python3, -c, "print(2)"]
  - env: {LEVEL: "2"}
  - workdir: sub
user: "1000"
""",
        tmp_path,
    )
    dockerfile = plan_dockerfile(
        "FROM default\nARG PORT=8000\nENV PORT=${PORT} MODE=prod\nWORKDIR /srv\n"
        'COPY --chown=1000:1000 app.py ./\nRUN python3 app.py\nRUN ["python3", "-c", "print(2)"]\n'
        "ENV LEVEL=2\nWORKDIR sub\nUSER 1000",
        tmp_path,
    )
    assert [step.text for step in recipe.steps] == [step.text for step in dockerfile.steps]
    assert [step.key for step in recipe.steps] == [step.key for step in dockerfile.steps]
    assert (recipe.env, recipe.workdir, recipe.user) == (dockerfile.env, dockerfile.workdir, dockerfile.user)
    assert recipe.source == "recipe" and recipe.workdir == "/srv/sub" and recipe.user == "1000"


def test_packages_settings_and_their_order():
    plan = plan_recipe(
        """
name: my-env
description: An environment
from: python:3.12
apt: [git, "curl=7.88.1-10+deb12u5"]
pip: ["requests>=2.31,<3", "uvicorn[standard]==0.30.0"]
npm: ["@scope/tool@^1.2.0", typescript]
steps:
  - apt: [jq]
resources: {vcpus: 2, memory_mib: 2048, disk_mib: 8192}
start: python3 -m http.server 8000
ready: {port: 8000, timeout_seconds: 30}
pool_size: 0
"""
    )
    assert [step.text for step in plan.steps] == [
        "APT git curl=7.88.1-10+deb12u5",
        "PIP requests>=2.31,<3 uvicorn[standard]==0.30.0",
        "NPM @scope/tool@^1.2.0 typescript",
        "APT jq",
    ]
    apt = plan.steps[0]
    assert isinstance(apt, PackagesStep) and "apt-get install" in apt.command.shell
    assert "'requests>=2.31,<3'" in plan.steps[1].command.shell  # quoted for the shell
    assert (plan.name, plan.description, plan.base.text) == ("my-env", "An environment", "python:3.12")
    assert plan.resources == Resources(vcpus=2, memory_mib=2048, disk_mib=8192)
    assert plan.start == Command(shell="python3 -m http.server 8000")
    assert plan.ready == ReadyCheck(port=8000, timeout_seconds=30)
    assert plan.pool_size == 0


def test_a_ready_command_and_exec_form_start():
    plan = plan_recipe("from: default\nstart: [node, server.js]\nready: {command: curl -sf localhost:3000}")
    assert plan.start == Command(argv=("node", "server.js"))
    assert plan.ready == ReadyCheck(command=Command(shell="curl -sf localhost:3000"), timeout_seconds=60)


def test_a_dockerfile_plan_has_no_settings():
    plan = plan_dockerfile("FROM default")
    assert plan.resources == Resources() and plan.start is None and plan.ready is None and plan.pool_size is None


def test_recipe_args_are_overridden_by_build_args_and_seen_by_every_step():
    text = 'from: ${BASE}\nargs: {BASE: default, V: null}\npip: ["pkg==${V:-1.0}"]\nsteps:\n  - run: echo $V'
    plan = plan_recipe(text)
    assert plan.base.name == "default" and plan.steps[0].packages == ("pkg==1.0",)
    overridden = plan_recipe(text, build_args={"BASE": "python", "V": "2.0"})
    assert overridden.base.name == "python" and overridden.steps[0].packages == ("pkg==2.0",)
    assert overridden.steps[1].build_args == (("BASE", "python"), ("V", "2.0"))
    assert refused(text, build_args={"W": "1"}).reason == "UNKNOWN_BUILD_ARG"


def test_recipe_values_have_no_quote_processing():
    plan = plan_recipe('from: default\nenv: {MSG: "it\'s \\"quoted\\"", COST: \'\\$5\', N: 3, V: 1.10}')
    assert dict(plan.env) == {"MSG": 'it\'s "quoted"', "COST": "$5", "N": "3", "V": "1.10"}


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("from: default\nfoo: 1", "foo", 2),
        ("from: default\nresources: {cpus: 2}", "resources.cpus", 2),
        ("from: default\nresources:\n  vcpus: 0", "resources.vcpus", 3),
        ("from: default\nresources: {vcpus: 65}", "resources.vcpus", 2),
        ("from: default\nresources: {memory_mib: 64}", "resources.memory_mib", 2),
        ("from: default\nresources: {disk_mib: 2.5}", "resources.disk_mib", 2),
        ("from: default\nresources: {vcpus: true}", "resources.vcpus", 2),
        ("from: default\nresources: [1]", "resources", 2),
        ("from: default\npool_size: 65", "pool_size", 2),
        ("from: default\npool_size: -1", "pool_size", 2),
        ("from: default\nready: {port: 70000}", "ready.port", 2),
        ("from: default\nready: {port: 80, command: x}", "ready", 2),
        ("from: default\nready: {timeout_seconds: 5}", "ready", 2),
        ("from: default\nready: {port: 80, timeout_seconds: 0}", "ready.timeout_seconds", 2),
        ("from: default\nready: {port: 80, interval: 1}", "ready.interval", 2),
        ("from: default\nstart: []", "start", 2),
        ("from: default\nstart: 5", "start", 2),
        ("from: default\nname: My_Template", "name", 2),
        ("from: default\ndescription: " + "x" * 1025, "description", 2),
        ("from: default\nenv: {DEBUG: yes}", "env.DEBUG", 2),
        ("from: default\nenv: {1X: a}", "env.1X", 2),
        ("from: default\nenv: {}", "env", 2),
        ("from: default\nenv: [A=1]", "env", 2),
        ("from: default\nargs: {A: [1]}", "args.A", 2),
        ("from: default\napt: [git, --allow-unauthenticated]", "apt[1]", 2),
        ("from: default\napt: []", "apt", 2),
        ('from: default\npip: ["-e git+https://x"]', "pip[0]", 2),
        ("from: default\npip: [https://example.com/x.whl]", "pip[0]", 2),
        ('from: default\nnpm: ["Evil Name"]', "npm[0]", 2),
        ("from: default\nsteps: {run: x}", "steps", 2),
        ("from: default\nsteps:\n  - run: x\n  - add: {src: a, dest: b}", "steps[1].add", 4),
        ("from: default\nsteps:\n  - {run: x, env: {A: b}}", "steps[0]", 3),
        ("from: default\nsteps:\n  - run: ''", "steps[0].run", 3),
        ("from: default\nsteps:\n  - copy: {src: a}", "steps[0].copy.dest", 3),
        ("from: default\nsteps:\n  - copy: {src: [], dest: /x}", "steps[0].copy.src", 3),
        ("from: default\nsteps:\n  - copy: {src: a, dest: /x, mode: 755}", "steps[0].copy.mode", 3),
        ("from: default\nsteps:\n  - workdir: 5", "steps[0].workdir", 3),
        ("from: default\nfrom: python", "from", 2),
        ("name: x", "from", None),
        ("from: [default]", "from", 1),
    ],
)
def test_recipe_refusals_name_the_key_path(text, key, line):
    error = refused(text)
    assert (error.reason, error.key, error.line) == ("INVALID_RECIPE", key, line)
    assert error.metadata()["key"] == key and key in str(error)


@pytest.mark.parametrize(
    "text",
    ["", "# nothing", "from: default\n---\nfrom: python", "- from: default", "from: [unclosed", "just text", "{{{"],
)
def test_malformed_yaml_is_invalid_recipe(text):
    assert refused(text).reason == "INVALID_RECIPE"


def test_yaml_aliases_and_non_string_keys_are_refused():
    error = refused("from: default\nenv: &e {A: b}\nsteps:\n  - env: *e")
    assert (error.reason, error.key) == ("INVALID_RECIPE", "steps[0].env")
    assert refused("from: default\nenv: {1: a}").key == "env"
    assert refused("from: default\n? [a, b]\n: c").reason == "INVALID_RECIPE"


def test_a_billion_laughs_is_refused_not_expanded():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(9)
    ]
    assert refused("\n".join(lines) + "\nfrom: default").reason == "INVALID_RECIPE"


def test_recipe_bad_base_and_substitution_errors_carry_the_key():
    error = refused("from: docker.io/library/debian")
    assert (error.reason, error.key, error.line) == ("INVALID_BASE", "from", 1)
    error = refused("from: default\nworkdir: ${X:?no}")
    assert (error.reason, error.key) == ("INVALID_VARIABLE", "workdir")
    error = refused("from: default\nsteps:\n  - copy: {src: a, dest: /x}")
    assert (error.reason, error.key, error.line) == ("COPY_SOURCE_NOT_FOUND", "steps[0].copy", 3)


def test_recipe_size_and_step_bounds():
    assert refused("from: default\nsteps:\n" + "  - run: x\n" * 501).reason == "DEFINITION_TOO_LARGE"
    assert refused("from: default\ndescription: " + "x" * (1 << 20)).reason == "DEFINITION_TOO_LARGE"
    assert refused("from: default\nsteps: " + "[" * 2000).reason == "INVALID_RECIPE"


BUILT_IN = sorted(path.parent.name for path in (REPO / "images" / "templates").glob("*/mvm.yaml"))


def test_the_built_in_recipes_are_the_known_ones():
    assert BUILT_IN == ["code-interpreter", "desktop", "e2b-desktop", "python", "web"]


def test_e2b_desktop_has_what_the_e2b_desktop_sdk_runs_and_no_session_of_its_own():
    # e2b_desktop starts Xvfb and XFCE itself after the create; its calls run these tools (docs/e2b.md).
    plan = load_plan(REPO / "images" / "templates" / "e2b-desktop" / "mvm.yaml")
    apt = {package for step in plan.steps if isinstance(step, PackagesStep) for package in step.packages}
    wanted = {"xvfb", "x11-utils", "xfce4-session", "xfwm4", "xfdesktop4", "xdotool", "scrot", "x11-xserver-utils"}
    assert wanted | {"xdg-utils", "libgtk-3-bin", "x11vnc", "novnc", "net-tools"} <= apt
    assert not plan.start, "a session of ours would hold display :0 and the window manager"


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_recipes_parse(name):
    plan = load_plan(REPO / "images" / "templates" / name / "mvm.yaml")
    assert plan.name == name and plan.description and plan.resources.vcpus
    assert plan.key == load_plan(REPO / "images" / "templates" / name / "mvm.yaml").key


def test_built_in_python_has_the_seed_agent_tools():
    plan = load_plan(REPO / "images" / "templates" / "python" / "mvm.yaml")
    apt = {package for step in plan.steps if isinstance(step, PackagesStep) for package in step.packages}
    assert {"python3", "python3-pip", "nodejs", "npm", "git", "build-essential"} <= apt
    assert plan.base.text == "default:latest"


def test_built_in_web_points_playwright_at_debian_chromium():
    plan = load_plan(REPO / "images" / "templates" / "web" / "mvm.yaml")
    packages = {package for step in plan.steps if isinstance(step, PackagesStep) for package in step.packages}
    assert {"chromium", "chromium-driver", "playwright", "selenium", "beautifulsoup4"} <= packages
    assert plan.base.text == "python:latest" and dict(plan.env)["CHROMIUM_PATH"] == "/usr/bin/chromium"
    helper = [entry for entry in plan.copied_files if entry.source == "mvm_browser.py"]
    assert helper and helper[0].dest.endswith("dist-packages/mvm_browser.py")
    source = (REPO / "images" / "templates" / "web" / "mvm_browser.py").read_text()
    assert "executable_path=CHROMIUM" in source


def test_base_image_recipes_are_not_template_recipes():
    """`make images` builds images/templates/*.yaml with images.builder; template recipes live in directories."""
    assert sorted(path.name for path in (REPO / "images" / "templates").glob("*.yaml")) == ["default.yaml"]
