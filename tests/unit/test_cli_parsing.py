"""`mvm`'s command line parsing: options anywhere before `--`, durations, help with defaults and an example."""

from __future__ import annotations

import argparse

import pytest

from mvm_cli.main import build_parser, parse
from mvm_cli.parsing import CliError, format_duration, parse_duration, parse_pairs


@pytest.mark.parametrize(
    "argv, id_, env, command",
    [
        (["exec", "sbx-1", "--env", "K=V", "--", "echo", "hi"], "sbx-1", ["K=V"], ["echo", "hi"]),
        (["exec", "--env", "K=V", "sbx-1", "--", "echo", "hi"], "sbx-1", ["K=V"], ["echo", "hi"]),
        (["exec", "sbx-1", "-e", "A=1", "-e", "B=2", "ls", "-la"], "sbx-1", ["A=1", "B=2"], ["ls", "-la"]),
        (["exec", "sbx-1", "--env=K=V", "--", "--env", "x"], "sbx-1", ["K=V"], ["--env", "x"]),
        (["exec", "sbx-1", "ls", "--env", "K=V"], "sbx-1", None, ["ls", "--env", "K=V"]),
        (["--debug", "exec", "sbx-1", "--", "true"], "sbx-1", None, ["true"]),
    ],
)
def test_exec_options_work_anywhere_before_the_command(argv, id_, env, command):
    args = parse(argv)
    assert (args.id, args.env, args.command) == (id_, env, command)


def test_exec_timeout_is_the_flag_and_exec_timeout_a_hidden_alias():
    assert parse(["exec", "sbx-1", "--timeout", "5m", "--", "true"]).exec_timeout == 300
    assert parse(["exec", "sbx-1", "--exec-timeout", "30", "--", "true"]).exec_timeout == 30
    text = build_parser()._subparsers._group_actions[0].choices["exec"].format_help()
    assert "--timeout DURATION" in text and "--exec-timeout" not in text


def test_run_splits_its_own_options_from_the_command():
    args = parse(["run", "--memory", "512", "--lifetime", "1h", "--timeout", "90s", "python3", "-c", "x"])
    assert (args.memory, args.lifetime, args.exec_timeout, args.command) == (512, 3600, 90, ["python3", "-c", "x"])
    assert parse(["run", "--", "echo", "--memory"]).command == ["echo", "--memory"]


def test_create_and_run_leave_the_size_to_the_template_unless_asked():
    # The gateway sizes a sandbox by its template when the request says 0 (a code-interpreter needs its 1 GiB):
    # a CLI default of 1 vCPU / 256 MiB overrode every template's own size.
    for command in (["create", "--template", "code-interpreter"], ["run", "--", "true"]):
        args = parse(command)
        assert (args.vcpus, args.memory) == (None, None), command
    assert (
        parse(["create", "--vcpus", "2", "--memory", "512"]).vcpus,
        parse(["create", "--memory", "512"]).memory,
    ) == (
        2,
        512,
    )


def test_global_options_go_before_or_after_the_command():
    assert parse(["--gateway", "h:1", "ls"]).gateway == "h:1"
    assert parse(["ls", "--gateway", "h:2", "--debug"]).gateway == "h:2"
    assert parse(["ls", "--debug"]).debug is True
    assert parse(["nodes", "get", "n1", "--gateway", "h:3"]).gateway == "h:3"


def test_commands_taking_several_ids_and_the_snapshot_group():
    assert parse(["rm", "a", "b", "c"]).ids == ["a", "b", "c"]
    assert parse(["pause", "a", "b"]).ids == ["a", "b"]
    assert parse(["snapshots", "rm", "s1", "s2"]).snapshots == ["s1", "s2"]
    assert parse(["snapshots", "--sandbox", "x"]).sandbox == "x"
    assert parse(["snapshots", "ls", "--sandbox", "x", "--json"]).json is True
    assert parse(["timeout", "sbx-1", "30m"]).duration == 1800
    assert parse(["create", "--env", "A=1", "--env", "B=2", "--timeout", "2h"]).lifetime == 7200


@pytest.mark.parametrize(
    "text, seconds",
    [("45", 45), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), (" 2H ", 7200)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "h", "-5", "1.5h", "30m2h"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_a_bad_duration_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["timeout", "sbx-1", "soon"])
    assert exit.value.code == 2 and "not a duration" in capsys.readouterr().err


def test_format_duration():
    assert [format_duration(s) for s in (0, 45, 90, 3661, 86400 + 7200 + 5, -3)] == [
        "0s",
        "45s",
        "1m30s",
        "1h1m",
        "1d2h",
        "0s",
    ]


def test_pairs():
    assert parse_pairs(["A=1", "B=x=y", "C="], "env") == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(CliError, match="env 'A' is not KEY=VALUE"):
        parse_pairs(["A"], "env")


def every_parser(parser: argparse.ArgumentParser, path: str = "mvm"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    yield from every_parser(sub, f"{path} {name}")


def test_every_command_help_shows_an_example_and_its_defaults():
    parsers = dict(every_parser(build_parser()))
    assert {"mvm exec", "mvm snapshots rm", "mvm nodes drain", "mvm timeout", "mvm completion"} <= set(parsers)
    for path, parser in parsers.items():
        text = parser.format_help()
        assert "example:\n  " in text, path
        for action in parser._actions:
            if (
                action.option_strings
                and action.help != argparse.SUPPRESS
                and action.default
                not in (
                    None,
                    False,
                    "",
                    [],
                    argparse.SUPPRESS,
                )
            ):
                assert f"(default: {action.default})" in " ".join(text.split()), (path, action.option_strings)
