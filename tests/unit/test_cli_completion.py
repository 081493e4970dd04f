"""`mvm completion bash|zsh`: generated from the parser, and the bash one completes as a user would see it (run in
a real bash, with `mvm` replaced by a function standing in for the gateway)."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from mvm_cli.completion import bash_script, shapes, zsh_script
from mvm_cli.main import build_parser, run

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def complete(*words: str) -> list[str]:
    """What bash offers for the command line `words` (the last one being completed)."""
    program = (
        bash_script(build_parser())
        + 'mvm() { case "$*" in "ls -q") echo sbx-one sbx-two ;; "snapshots ls -q") echo snap-a ;; esac; }\n'
        + f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        + "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        + '_mvm mvm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        + 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_the_script_knows_every_command_and_option_of_the_parser():
    parser = build_parser()
    found = shapes(parser)
    assert {"mvm exec", "mvm snapshots rm", "mvm nodes drain", "mvm completion"} <= set(found)
    assert "--timeout" in found["mvm exec"].options and "--exec-timeout" not in found["mvm exec"].options
    assert found["mvm ls"].choices["--state"][:2] == ["creating", "running"]
    assert found["mvm rm"].positionals == "sandboxes" and found["mvm snapshots rm"].positionals == "snapshots"


def test_bash_completes_commands_options_choices_and_ids():
    assert complete("mvm", "sn") == ["snapshot", "snapshots"]
    assert complete("mvm", "--gateway", "h:1", "ex") == ["exec", "expose"]
    assert complete("mvm", "exec", "--ti") == ["--timeout"]
    assert complete("mvm", "ls", "--state", "p") == ["paused"]
    assert complete("mvm", "exec", "") == ["sbx-one", "sbx-two"]
    assert complete("mvm", "exec", "--env", "A=1", "sbx-one", "") == []  # the rest is the remote command
    assert complete("mvm", "rm", "sbx-one", "") == ["sbx-one", "sbx-two"]
    assert complete("mvm", "snapshots", "rm", "") == ["snap-a"]
    assert complete("mvm", "nodes", "") == ["get", "cordon", "uncordon", "drain"]
    assert complete("mvm", "completion", "") == ["bash", "zsh"]
    assert complete("mvm", "run", "--", "") == []


def test_the_scripts_are_valid_and_printed_by_the_command(capsys):
    script = bash_script(build_parser())
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert run(["completion", "bash"]) == 0
    assert capsys.readouterr().out == script
    assert run(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh == zsh_script(build_parser())
    assert "bashcompinit" in zsh and "complete -F _mvm mvm" in zsh


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_runs_the_same_completion_through_bashcompinit():
    """zsh counts words from 1 and does its own prefix matching: the function must still find the command path."""
    program = (
        "autoload -U compinit && compinit -u\n"
        + zsh_script(build_parser())
        + "mvm() { echo sbx-one sbx-two; }\n"
        + 't() { COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); '
        + '_mvm mvm "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"; print -r -- "${COMPREPLY[*]}"; }\n'
        + 't mvm nodes ""\nt mvm ls --state ""\nt mvm exec ""\nt mvm exec sbx-one ""\n'
    )
    result = subprocess.run(["zsh", "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "get cordon uncordon drain",
        "creating running paused deleting failed unavailable migrating",
        "sbx-one sbx-two",
        "",
    ]
