"""The Dockerfile subset of template definitions (images/definition): every instruction and form, ARG scope and
substitution, and every refusal with its reason and line. Pure: no guests, no network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from images.definition import (
    CopyStep,
    DefinitionError,
    EnvStep,
    RunStep,
    UserStep,
    WorkdirStep,
    plan_dockerfile,
)


def refused(text: str, context: Path | None = None, **kwargs) -> DefinitionError:
    with pytest.raises(DefinitionError) as caught:
        plan_dockerfile(text, context, **kwargs)
    return caught.value


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('hi')\n")
    (tmp_path / "app" / "lib").mkdir()
    (tmp_path / "app" / "lib" / "util.py").write_text("X = 1\n")
    (tmp_path / "requirements.txt").write_text("requests\n")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    return tmp_path


# -- FROM


@pytest.mark.parametrize(
    ("line", "kind", "name", "tag", "text"),
    [
        ("FROM default", "template", "default", "latest", "default:latest"),
        ("FROM python:3.12", "template", "python", "3.12", "python:3.12"),
        ("from web-2:v1_x", "template", "web-2", "v1_x", "web-2:v1_x"),
    ],
)
def test_from_names_a_template_with_latest_as_the_default_tag(line, kind, name, tag, text):
    plan = plan_dockerfile(line)
    assert (plan.base.kind, plan.base.name, plan.base.tag, plan.base.text) == (kind, name, tag, text)
    assert plan.steps == () and plan.workdir == "/" and plan.user is None and plan.source == "dockerfile"


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
def test_from_an_image_archive_in_the_context_hashes_its_content(tmp_path, kind):
    (tmp_path / "image.tar").write_bytes(b"layer bytes")
    first = plan_dockerfile(f"FROM {kind}:image.tar", tmp_path)
    assert (first.base.kind, first.base.path, first.base.text) == (kind, "image.tar", f"{kind}:image.tar")
    assert first.base.digest == hashlib.sha256(b"layer bytes").hexdigest()
    (tmp_path / "image.tar").write_bytes(b"other layer bytes")
    assert plan_dockerfile(f"FROM {kind}:image.tar", tmp_path).base_key != first.base_key


def test_from_an_oci_layout_directory(tmp_path):
    (tmp_path / "layout" / "blobs").mkdir(parents=True)
    (tmp_path / "layout" / "index.json").write_text("{}")
    plan = plan_dockerfile("FROM oci:layout", tmp_path)
    assert plan.base.kind == "oci" and plan.base.digest
    assert refused("FROM oci:layout/index.json", tmp_path).reason == "INVALID_BASE"
    assert refused("FROM oci-archive:layout", tmp_path).reason == "INVALID_BASE"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("FROM docker.io/library/ubuntu:22.04", "INVALID_BASE"),
        ("FROM Default", "INVALID_BASE"),
        ("FROM oci-archive:", "INVALID_BASE"),
        ("FROM a b", "INVALID_DOCKERFILE"),
        ("FROM default AS build", "UNSUPPORTED_INSTRUCTION"),
        ("FROM --platform=linux/arm64 default", "UNSUPPORTED_FLAG"),
        ("FROM oci-archive:/etc/image.tar", "COPY_OUTSIDE_CONTEXT"),
        ("FROM docker-archive:../image.tar", "COPY_OUTSIDE_CONTEXT"),
        ("FROM docker-archive:missing.tar", "COPY_SOURCE_NOT_FOUND"),
    ],
)
def test_bad_bases_are_refused_on_their_line(tmp_path, text, reason):
    error = refused("# a comment\n\n" + text, tmp_path)
    assert (error.reason, error.line) == (reason, 3)


def test_from_must_come_first_and_only_once():
    assert (refused("RUN true").reason, refused("RUN true").line) == ("INVALID_DOCKERFILE", 1)
    assert refused("").reason == "INVALID_DOCKERFILE"
    assert refused("# only a comment\n").reason == "INVALID_DOCKERFILE"
    assert "no FROM" in refused("ARG A=1").message
    error = refused("FROM default\nRUN true\nFROM python")
    assert (error.reason, error.line, error.instruction) == ("UNSUPPORTED_INSTRUCTION", 3, "FROM")


# -- RUN


def test_run_shell_and_exec_forms():
    plan = plan_dockerfile('FROM default\nRUN apt-get update && echo "$HOME"\nRUN ["python3", "-c", "print(1)"]')
    shell, exec_form = plan.steps
    assert isinstance(shell, RunStep) and shell.command.shell == 'apt-get update && echo "$HOME"'
    assert shell.command.as_argv() == ("/bin/sh", "-c", 'apt-get update && echo "$HOME"')
    assert exec_form.command.argv == ("python3", "-c", "print(1)")
    assert shell.text == 'RUN apt-get update && echo "$HOME"'
    assert exec_form.text == 'RUN ["python3","-c","print(1)"]'


def test_run_text_is_not_substituted_by_the_parser_the_shell_does_it():
    plan = plan_dockerfile("FROM default\nARG V=1\nENV E=2\nRUN echo $V ${E}")
    assert plan.steps[-1].command.shell == "echo $V ${E}"
    assert plan.steps[-1].build_args == (("V", "1"),)


def test_run_that_is_not_a_json_array_of_strings_is_shell_form():
    plan = plan_dockerfile('FROM default\nRUN [ -f /etc/passwd ] && echo yes\nRUN ["a", 1]')
    assert plan.steps[0].command.shell == "[ -f /etc/passwd ] && echo yes"
    assert plan.steps[1].command.shell == '["a", 1]'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("RUN --mount=type=cache,target=/root/.cache pip install x", "UNSUPPORTED_FLAG"),
        ("RUN --network=none true", "UNSUPPORTED_FLAG"),
        ("RUN --security=insecure true", "UNSUPPORTED_FLAG"),
        ("RUN", "INVALID_DOCKERFILE"),
        ("RUN []", "INVALID_DOCKERFILE"),
        ("RUN <<EOF", "UNSUPPORTED_INSTRUCTION"),
        ("RUN cat <<-'EOF' > /x", "UNSUPPORTED_INSTRUCTION"),
    ],
)
def test_run_refusals_name_the_line_and_instruction(line, reason):
    error = refused(f"FROM default\n{line}\nEOF")
    assert (error.reason, error.line, error.instruction) == (reason, 2, "RUN")
    assert "line 2" in str(error)


def test_a_here_string_or_a_quoted_heredoc_marker_is_not_a_heredoc():
    plan = plan_dockerfile('FROM default\nRUN cat <<< hello\nRUN echo "<<EOF"\nRUN echo $((1<<3))')
    assert len(plan.steps) == 3


# -- lines, comments, continuations, directives


def test_continuations_comments_and_blank_lines_inside_an_instruction():
    text = (
        "FROM default\n\n  # leading comment\nRUN echo a \\\n  # dropped comment\n\n"
        "    && echo b \\  \n    && echo c\nUSER x"
    )
    plan = plan_dockerfile(text)
    assert plan.steps[0].command.shell == "echo a     && echo b     && echo c"
    assert plan.steps[0].where.line == 4
    assert plan.steps[1].where.line == 9


def test_a_hash_after_an_instruction_is_not_a_comment():
    plan = plan_dockerfile("FROM default\nRUN echo hi # not a comment")
    assert plan.steps[0].command.shell == "echo hi # not a comment"


def test_instructions_are_case_insensitive_and_crlf_and_a_byte_order_mark_are_accepted():
    plan = plan_dockerfile("\ufefffrom default\r\nrun true\r\nWorkDir /x\r\n")
    assert [step.text for step in plan.steps] == ["RUN true", "WORKDIR /x"]


def test_a_final_continuation_ends_the_file():
    assert plan_dockerfile("FROM default\nRUN echo a \\").steps[0].command.shell == "echo a"


def test_syntax_and_check_directives_are_ignored_escape_is_refused():
    assert plan_dockerfile("# syntax=docker/dockerfile:1\n# check=skip=all\nFROM default").base.name == "default"
    error = refused("# escape=`\nFROM default")
    assert (error.reason, error.line) == ("UNSUPPORTED_DIRECTIVE", 1)
    # After the first other line directives are plain comments, as Docker reads them.
    assert plan_dockerfile("# hello\n# escape=`\nFROM default").base.name == "default"


# -- refused instructions


@pytest.mark.parametrize(
    "keyword", ["ADD", "CMD", "ENTRYPOINT", "HEALTHCHECK", "EXPOSE", "ONBUILD", "VOLUME", "LABEL", "SHELL"]
)
def test_instructions_outside_the_subset_are_refused_with_line_and_name(keyword):
    error = refused(f"FROM default\nRUN true\n{keyword} something here")
    assert (error.reason, error.line, error.instruction) == ("UNSUPPORTED_INSTRUCTION", 3, keyword)
    assert keyword in error.message and error.metadata() == {"line": "3", "instruction": keyword}


def test_an_unknown_word_is_an_unsupported_instruction():
    error = refused("FROM default\nINSTALL curl")
    assert (error.reason, error.line) == ("UNSUPPORTED_INSTRUCTION", 2) and "INSTALL" in error.message


def test_add_with_a_url_is_refused():
    error = refused("FROM default\nADD https://example.com/x.tar.gz /opt/")
    assert (error.reason, error.instruction) == ("UNSUPPORTED_INSTRUCTION", "ADD") and "COPY" in error.message


# -- ENV, WORKDIR, USER


def test_env_both_forms_quotes_and_substitution_from_before_the_instruction():
    text = "FROM default\nENV A=1 B=\"two words\" C='$A' D=x\\ y\nENV A=2 E=$A\nENV LEGACY value with  spaces $A"
    plan = plan_dockerfile(text)
    assert plan.steps[0].values == (("A", "1"), ("B", "two words"), ("C", "$A"), ("D", "x y"))
    assert plan.steps[1].values == (("A", "2"), ("E", "1"))  # $A as it was before this ENV
    assert plan.steps[2].values == (("LEGACY", "value with  spaces 2"),)
    assert dict(plan.env) == {
        "A": "2",
        "B": "two words",
        "C": "$A",
        "D": "x y",
        "E": "1",
        "LEGACY": "value with  spaces 2",
    }
    assert isinstance(plan.steps[0], EnvStep) and plan.steps[0].text == "ENV A=1 B='two words' C='$A' D='x y'"


@pytest.mark.parametrize("line", ["ENV ONLY", "ENV A=1 B", "ENV 1A=x", 'ENV A="open'])
def test_bad_env_lines(line):
    error = refused(f"FROM default\n{line}")
    assert (error.reason, error.line, error.instruction) == ("INVALID_DOCKERFILE", 2, "ENV")


def test_workdir_is_absolute_and_relative_ones_build_on_the_last():
    plan = plan_dockerfile("FROM default\nWORKDIR /srv\nWORKDIR app\nWORKDIR ../other/./x\nENV D=/data\nWORKDIR $D")
    assert [step.path for step in plan.steps if isinstance(step, WorkdirStep)] == [
        "/srv",
        "/srv/app",
        "/srv/other/x",
        "/data",
    ]
    assert plan.workdir == "/data"


def test_user_forms_and_refusals():
    plan = plan_dockerfile("FROM default\nARG UID=1000\nUSER ${UID}:100\nUSER nobody")
    assert [step.user for step in plan.steps if isinstance(step, UserStep)] == ["1000:100", "nobody"]
    assert plan.user == "nobody"
    assert refused("FROM default\nUSER a b").reason == "INVALID_DOCKERFILE"
    assert refused("FROM default\nUSER $UNSET").reason == "INVALID_DOCKERFILE"


# -- ARG


def test_arg_defaults_overrides_and_substitution_where_docker_substitutes(context):
    text = (
        "ARG BASE=default\nARG TAG\nFROM ${BASE}:${TAG:-stable}\nARG BASE\nARG DIR=/opt/${BASE}\n"
        "ENV HOME_DIR=$DIR SET=${BASE:+yes} UNSET=${NOPE:+yes}\nWORKDIR $DIR\nCOPY a.txt ${DIR}/\nUSER ${WHO:-nobody}"
    )
    plan = plan_dockerfile(text, context)
    assert plan.base.text == "default:stable"
    assert dict(plan.env) == {"HOME_DIR": "/opt/default", "SET": "yes", "UNSET": ""}
    assert plan.workdir == "/opt/default" and plan.user == "nobody"
    assert plan.steps[2].entries[0].dest == "/opt/default/a.txt"
    overridden = plan_dockerfile(text, context, build_args={"BASE": "python", "TAG": "3.12", "DIR": "/x"})
    assert overridden.base.text == "python:3.12" and overridden.workdir == "/x"
    assert dict(overridden.build_args) == {"BASE": "python", "TAG": "3.12", "DIR": "/x"}


def test_args_before_from_leave_scope_unless_declared_again():
    plan = plan_dockerfile("ARG V=1\nFROM default\nENV A=$V\nARG V\nENV B=$V")
    assert dict(plan.env) == {"A": "", "B": "1"}


def test_several_args_on_one_line_and_env_wins_over_arg():
    plan = plan_dockerfile("FROM default\nARG A=1 B=2\nENV A=env\nENV C=$A$B")
    assert dict(plan.env)["C"] == "env2"


def test_an_undeclared_build_arg_is_refused_but_proxy_args_pass_outside_the_key():
    error = refused("FROM default\nARG A", build_args={"B": "1"})
    assert (error.reason, error.key) == ("UNKNOWN_BUILD_ARG", "B")
    plain = plan_dockerfile("FROM default\nRUN curl x")
    proxied = plan_dockerfile("FROM default\nRUN curl x", build_args={"HTTPS_PROXY": "http://proxy:3128"})
    assert proxied.proxy_args == (("HTTPS_PROXY", "http://proxy:3128"),)
    assert proxied.steps[0].key == plain.steps[0].key and proxied.key == plain.key


def test_bad_arg_names_and_substitutions():
    assert refused("FROM default\nARG 1X=2").reason == "INVALID_DOCKERFILE"
    error = refused("FROM default\nWORKDIR ${X:?required}")
    assert (error.reason, error.line) == ("INVALID_VARIABLE", 2)
    assert refused("FROM default\nWORKDIR ${X").reason == "INVALID_VARIABLE"
    assert refused("FROM default\nWORKDIR ${}").reason == "INVALID_VARIABLE"


def test_escaped_dollar_and_lone_dollar_are_literal():
    plan = plan_dockerfile("FROM default\nARG A=1\nENV X=\\$A Y=$ Z=a$-b")
    assert dict(plan.env) == {"X": "$A", "Y": "$", "Z": "a$-b"}


# -- COPY


def test_copy_a_file_to_a_path_and_into_a_directory(context):
    plan = plan_dockerfile("FROM default\nCOPY a.txt /etc/renamed\nCOPY a.txt /etc/\nCOPY a.txt b.txt /srv/", context)
    assert [entry.dest for entry in plan.steps[0].entries] == ["/etc/renamed"]
    assert [entry.dest for entry in plan.steps[1].entries] == ["/etc/a.txt"]
    assert [entry.dest for entry in plan.steps[2].entries] == ["/srv/a.txt", "/srv/b.txt"]
    assert plan.steps[2].text == "COPY a.txt b.txt /srv/"


def test_copy_of_a_directory_copies_its_contents(context):
    plan = plan_dockerfile("FROM default\nCOPY app /opt/app", context)
    step = plan.steps[0]
    assert isinstance(step, CopyStep)
    assert [(entry.source, entry.dest, entry.kind) for entry in step.entries] == [
        ("app/lib", "/opt/app/lib", "dir"),
        ("app/lib/util.py", "/opt/app/lib/util.py", "file"),
        ("app/main.py", "/opt/app/main.py", "file"),
    ]
    main = step.entries[-1]
    assert main.size == len("print('hi')\n") and len(main.digest) == 64 and main.mode & 0o777 == 0o644


def test_copy_relative_destination_is_under_the_workdir(context):
    plan = plan_dockerfile("FROM default\nWORKDIR /srv\nCOPY a.txt .\nCOPY b.txt sub/b", context)
    assert plan.steps[1].entries[0].dest == "/srv/a.txt" and plan.steps[1].dest == "/srv/"
    assert plan.steps[2].entries[0].dest == "/srv/sub/b"


def test_copy_wildcards_chown_and_json_form(context):
    plan = plan_dockerfile(
        'FROM default\nCOPY --chown=app:app ?.txt /data/\nCOPY ["app/main.py", "/opt/main.py"]\nCOPY a?txt /one',
        context,
    )
    assert [entry.dest for entry in plan.steps[0].entries] == ["/data/a.txt", "/data/b.txt"]
    assert plan.steps[0].chown == "app:app" and plan.steps[0].text == "COPY --chown=app:app ?.txt /data/"
    assert plan.steps[1].entries[0].dest == "/opt/main.py"
    assert plan.steps[2].entries[0].dest == "/one"  # one match: no trailing slash needed


def test_several_sources_need_a_destination_ending_in_a_slash(context):
    for line in ("COPY a.txt b.txt /srv", "COPY *.txt /srv"):
        error = refused(f"FROM default\n{line}", context)
        assert (error.reason, error.line, error.instruction) == ("INVALID_DOCKERFILE", 2, "COPY")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("COPY a.txt", "INVALID_DOCKERFILE"),
        ("COPY --from=build /x /y", "UNSUPPORTED_FLAG"),
        ("COPY --chmod=755 a.txt /y", "UNSUPPORTED_FLAG"),
        ("COPY --link a.txt /y", "UNSUPPORTED_FLAG"),
        ("COPY --chown= a.txt /y", "INVALID_DOCKERFILE"),
        ("COPY --chown=a --chown=b a.txt /y", "INVALID_DOCKERFILE"),
        ("COPY --chown='a b' a.txt /y", "INVALID_DOCKERFILE"),
        ("COPY missing.txt /y", "COPY_SOURCE_NOT_FOUND"),
        ("COPY *.md /y/", "COPY_SOURCE_NOT_FOUND"),
        ("COPY /etc/passwd /y", "COPY_OUTSIDE_CONTEXT"),
        ("COPY ../secret /y", "COPY_OUTSIDE_CONTEXT"),
        ("COPY app/../../secret /y", "COPY_OUTSIDE_CONTEXT"),
        ("COPY <<EOF /y", "UNSUPPORTED_INSTRUCTION"),
    ],
)
def test_copy_refusals(context, line, reason):
    error = refused(f"FROM default\n{line}", context)
    assert (error.reason, error.line) == (reason, 2)


def test_copy_without_a_context_says_so():
    error = refused("FROM default\nCOPY a /b")
    assert (error.reason, error.line) == ("COPY_SOURCE_NOT_FOUND", 2) and "context" in error.message


def test_the_plan_is_frozen(context):
    plan = plan_dockerfile("FROM default\nCOPY a.txt /a", context)
    with pytest.raises(AttributeError):
        plan.workdir = "/x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.steps[0].dest = "/b"  # type: ignore[misc]
    assert plan.copied_files[0].source == "a.txt"


def test_limits_on_the_dockerfile_itself():
    assert refused("FROM default\n" + "RUN true\n" * 1001).reason == "DEFINITION_TOO_LARGE"
    assert refused("FROM default\nRUN " + "x" * (1 << 20)).reason == "DEFINITION_TOO_LARGE"
