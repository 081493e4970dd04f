"""Cache keys of template build plans, and hostile build contexts: keys are stable across runs and change
exactly when a step, its parent or a copied file changes; nothing outside the context is ever read; arbitrary
input raises only DefinitionError (hypothesis)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from images.definition import ContextLimits, DefinitionError, ResolvedBase, plan_dockerfile, plan_recipe
from images.definition.errors import REASONS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = "FROM default\nENV A=1\nCOPY app /app\nRUN make -C /app\nUSER nobody\n"


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Makefile").write_text("all:\n\ttrue\n")
    (tmp_path / "app" / "src.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "unrelated.txt").write_text("not copied\n")
    return tmp_path


def keys(context: Path, text: str = DOCKERFILE, **kwargs) -> list[str]:
    plan = plan_dockerfile(text, context, **kwargs)
    return [plan.base_key, *[step.key for step in plan.steps], plan.key]


def refused(text: str, context: Path | None = None, **kwargs) -> DefinitionError:
    with pytest.raises(DefinitionError) as caught:
        plan_dockerfile(text, context, **kwargs)
    return caught.value


# -- keys


def test_keys_are_stable_across_processes(context):
    code = (
        "import sys, json; from images.definition import plan_dockerfile as p; "
        "plan = p(sys.argv[1], sys.argv[2]); print(json.dumps([s.key for s in plan.steps] + [plan.key]))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code, DOCKERFILE, str(context)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str(keys(context)[1:]).replace("'", '"')


def test_each_key_chains_on_its_parent(context):
    plan = plan_dockerfile(DOCKERFILE, context)
    assert plan.steps[0].parent == plan.base_key
    assert all(step.parent == before.key for before, step in zip(plan.steps, plan.steps[1:], strict=False))
    assert len({step.key for step in plan.steps}) == len(plan.steps)


def test_changing_a_step_changes_its_key_and_every_key_after_it_only(context):
    before = keys(context)
    after = keys(context, DOCKERFILE.replace("make -C /app", "make -C /app install"))
    assert before[:3] == after[:3]  # base, ENV, COPY unchanged
    assert all(old != new for old, new in zip(before[3:], after[3:], strict=True))


def test_changing_the_base_changes_every_key(context):
    before = keys(context)
    after = keys(context, DOCKERFILE.replace("FROM default", "FROM default:v2"))
    assert all(old != new for old, new in zip(before, after, strict=True))


def test_a_copied_file_changes_the_copy_key_and_after(context):
    before = keys(context)
    (context / "app" / "src.c").write_text("int main(void) { return 1; }\n")
    after = keys(context)
    assert before[:2] == after[:2] and all(old != new for old, new in zip(before[2:], after[2:], strict=True))


def test_a_copied_files_mode_and_a_new_file_change_the_copy_key(context):
    before = keys(context)[2]
    (context / "app" / "src.c").chmod(0o755)
    moded = keys(context)[2]
    (context / "app" / "new.h").write_text("")
    assert len({before, moded, keys(context)[2]}) == 3


def test_a_symlink_target_is_part_of_the_key(context):
    (context / "app" / "link").symlink_to("Makefile")
    before = keys(context)[2]
    (context / "app" / "link").unlink()
    (context / "app" / "link").symlink_to("src.c")
    assert keys(context)[2] != before


def test_an_unrelated_file_in_the_context_changes_nothing(context):
    before = keys(context)
    (context / "unrelated.txt").write_text("changed\n")
    (context / "another").mkdir()
    (context / "another" / "file").write_text("x")
    assert keys(context) == before


def test_file_mtimes_do_not_change_keys(context):
    before = keys(context)
    os.utime(context / "app" / "src.c", (1, 1))
    assert keys(context) == before


def test_arg_values_change_run_keys_but_not_copy_keys(context):
    text = "FROM default\nARG V=1\nCOPY app /app\nRUN echo $V"
    before = keys(context, text)
    after = keys(context, text, build_args={"V": "2"})
    assert before[:2] == after[:2] and before[2:] != after[2:]


def test_start_ready_and_resources_change_only_the_plan_key(context):
    base = "from: default\nsteps:\n  - copy: {src: app, dest: /app}\n"
    plain = plan_recipe(base, context)
    for extra in ("start: ./serve", "ready: {port: 80}", "resources: {memory_mib: 512}"):
        other = plan_recipe(base + extra, context)
        assert [s.key for s in other.steps] == [s.key for s in plain.steps] and other.key != plain.key
    assert plan_recipe(base + "pool_size: 3\ndescription: d", context).key == plain.key


# -- hostile contexts


def test_a_symlink_in_a_copied_directory_that_escapes_is_refused(context, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_text("secret")
    (context / "app" / "escape").symlink_to(outside / "secret")
    error = refused(DOCKERFILE, context)
    assert (error.reason, error.line) == ("SYMLINK_OUTSIDE_CONTEXT", 3) and "escape" in error.message


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "../.."])
def test_relative_and_absolute_escaping_links_are_refused(context, target):
    (context / "app" / "escape").symlink_to(target)
    assert refused(DOCKERFILE, context).reason == "SYMLINK_OUTSIDE_CONTEXT"


def test_a_symlink_that_stays_inside_is_copied_as_a_link(context):
    (context / "app" / "up").symlink_to("../unrelated.txt")
    entry = next(e for e in plan_dockerfile(DOCKERFILE, context).steps[1].entries if e.source == "app/up")
    assert (entry.kind, entry.target, entry.dest) == ("symlink", "../unrelated.txt", "/app/up")


def test_a_named_source_that_is_a_symlink_is_followed_inside_and_refused_outside(context, tmp_path_factory):
    (context / "alias.txt").symlink_to("unrelated.txt")
    entry = plan_dockerfile("FROM default\nCOPY alias.txt /x", context).steps[0].entries[0]
    assert (entry.kind, entry.digest is not None) == ("file", True)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_text("secret")
    (context / "out").symlink_to(outside)
    for source in ("out", "out/secret", "out/*"):
        error = refused(f"FROM default\nCOPY {source} /x/", context)
        assert error.reason in ("SYMLINK_OUTSIDE_CONTEXT", "COPY_SOURCE_NOT_FOUND"), source
        assert error.reason == "SYMLINK_OUTSIDE_CONTEXT" or source == "out/*"


def test_an_escaping_symlink_nothing_copies_is_harmless(context):
    (context / "elsewhere").mkdir()
    (context / "elsewhere" / "escape").symlink_to("/etc/passwd")
    assert plan_dockerfile(DOCKERFILE, context).steps


@pytest.mark.parametrize("source", ["/etc/passwd", "../x", "app/../../x", "./../x", "/"])
def test_sources_outside_the_context_are_refused(context, source):
    assert refused(f"FROM default\nCOPY {source} /x/", context).reason == "COPY_OUTSIDE_CONTEXT"


def test_a_fifo_is_refused_without_being_opened(context):
    os.mkfifo(context / "app" / "pipe")
    error = refused(DOCKERFILE, context)
    assert error.reason == "UNSUPPORTED_FILE" and "pipe" in error.message


def test_a_non_utf8_file_name_is_refused(context):
    (context / "app" / os.fsdecode(b"bad\xff")).write_text("")
    assert refused(DOCKERFILE, context).reason == "UNSUPPORTED_FILE"


def test_context_limits_bound_bytes_and_entries(context):
    (context / "app" / "big").write_bytes(b"x" * 5000)
    assert refused(DOCKERFILE, context, limits=ContextLimits(max_bytes=4096)).reason == "CONTEXT_TOO_LARGE"
    error = refused(DOCKERFILE, context, limits=ContextLimits(max_entries=2))
    assert (error.reason, error.line) == ("CONTEXT_TOO_LARGE", 3)
    assert plan_dockerfile(DOCKERFILE, context, limits=ContextLimits(max_bytes=8192, max_entries=3)).steps


def test_copying_the_whole_context(context):
    plan = plan_dockerfile("FROM default\nCOPY . /src/", context)
    assert {entry.dest for entry in plan.steps[0].entries} == {
        "/src/app",
        "/src/app/Makefile",
        "/src/app/src.c",
        "/src/unrelated.txt",
    }


# -- arbitrary input


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400))
def test_any_dockerfile_text_raises_only_definition_errors(context, text):
    for candidate in (text, "FROM default\n" + text):
        try:
            plan_dockerfile(candidate, context)
        except DefinitionError as error:
            assert error.reason in REASONS and (error.line is None or error.line >= 1)


instruction = st.sampled_from(["FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "USER", "ADD", "from", "#", ""])
fragment = st.sampled_from(["$A", "${A:-x}", "${", "'", '"', "\\", "=", "--chown=a", "[", '["a"]', "..", "/", "*", " "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.tuples(instruction, st.lists(st.one_of(fragment, st.text(max_size=6)), max_size=6)), max_size=8)
)
def test_dockerfile_shaped_input_raises_only_definition_errors(context, lines):
    text = "\n".join(f"{word} {''.join(parts)}" for word, parts in lines)
    try:
        plan_dockerfile("FROM default\n" + text, context, build_args={"A": "1"} if "ARG" in text else None)
    except DefinitionError as error:
        assert error.reason in REASONS


yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.floats(allow_nan=False))
yaml_value = st.recursive(
    yaml_scalar,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(
        st.sampled_from(["from", "env", "args", "steps", "apt", "resources", "ready", "start", "user", "x"]),
        yaml_value,
    ),
    text=st.text(max_size=200),
)
def test_any_recipe_raises_only_definition_errors(context, data, text):
    import yaml

    for candidate in (yaml.safe_dump(data), text):
        try:
            plan_recipe(candidate, context)
        except DefinitionError as error:
            assert error.reason in REASONS


def test_a_deep_context_is_walked_without_recursion(context):
    levels = [context / "app"]
    for _ in range(1200):  # deeper than Python's recursion limit, made a level at a time (mkdir -p recurses)
        levels.append(levels[-1] / "d")
        os.mkdir(levels[-1])
    (levels[-1] / "leaf").write_text("leaf")
    try:
        entries = plan_dockerfile(DOCKERFILE, context).steps[1].entries
        assert len(entries) == 1200 + 1 + 2 and any(entry.source.endswith("/d/leaf") for entry in entries)
    finally:  # removed a level at a time too: shutil.rmtree (and pytest's tmp_path clean-up) would recurse
        (levels[-1] / "leaf").unlink()
        for level in reversed(levels[1:]):
            os.rmdir(level)


def test_a_definition_error_becomes_invalid_argument_with_error_info():
    """What a service will do with one (services/common/errors.py): INVALID_ARGUMENT, the reason, line or key."""
    from google.rpc import error_details_pb2, status_pb2

    from services.common.errors import InvalidArgument

    error = refused("FROM default\nHEALTHCHECK CMD true")
    status = InvalidArgument(str(error), reason=error.reason, metadata=error.metadata()).to_status()
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"]).details[0].Unpack(info)
    assert status.code.name == "INVALID_ARGUMENT" and "line 2" in status.details
    assert info.reason == "UNSUPPORTED_INSTRUCTION"
    assert dict(info.metadata) == {"line": "2", "instruction": "HEALTHCHECK"}


def test_env_can_extend_the_bases_path():
    plan = plan_dockerfile("FROM default\nENV PATH=/opt/venv/bin:$PATH")
    assert dict(plan.env)["PATH"] == "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert dict(plan.base_env) == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def test_a_base_resolver_binds_keys_to_the_build_a_tag_names_and_gives_its_env(context):
    seen = []

    def resolver(build: str):
        def resolve(base):
            seen.append(base.text)
            return ResolvedBase(digest=build, env=(("PATH", "/base/bin"), ("LANG", "C.UTF-8"), ("V", "base")))

        return resolve

    text = "FROM python:3.12\nARG V=arg\nENV PATH=/x:$PATH L=$LANG W=$V\nCOPY app /app"
    first = plan_dockerfile(text, context, resolve_base=resolver("build-1"))
    assert seen == ["python:3.12"] and first.base.digest == "build-1"
    assert dict(first.env) == {"PATH": "/x:/base/bin", "L": "C.UTF-8", "W": "base"}  # the base's ENV beats an ARG
    moved = plan_dockerfile(text, context, resolve_base=resolver("build-2"))
    assert all(a.key != b.key for a, b in zip(first.steps, moved.steps, strict=True)) and first.key != moved.key
    assert plan_dockerfile(text, context, resolve_base=resolver("build-1")).key == first.key
