"""`mvm completion bash|zsh`: a shell completion script generated from mvm's own argparse parser, so it never
drifts from the commands.

    source <(mvm completion bash)        # ~/.bashrc
    source <(mvm completion zsh)         # ~/.zshrc, after compinit

It completes command names, options, option choices (`--state`, `--egress`), sandbox and snapshot ids and template
names (asking the gateway through `mvm ls -q` / `mvm snapshots ls -q` / `mvm template ls -q`). zsh runs the same
function through its bash completion compatibility (bashcompinit), which hands every candidate to zsh's own matching.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

ROOT = "mvm"


@dataclass
class CommandShape:
    """What completion needs of one command: its subcommands, options, which options take a value (and its
    choices), and what its positionals are."""

    commands: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    valued: list[str] = field(default_factory=list)
    choices: dict[str, list[str]] = field(default_factory=dict)
    positionals: str = ""


def _positional_kind(action: argparse.Action) -> str:
    """`sandbox`/`sandboxes`, `snapshot`/`snapshots`, `template`/`templates`, `files`, `choice:a b`, or ``."""
    many = action.nargs in ("+", "*")
    if action.choices:
        return "choice:" + " ".join(map(str, action.choices))
    metavar = str(action.metavar or action.dest).upper()
    if metavar == "ID" or metavar == "IDS":
        return "sandboxes" if many else "sandbox"
    if metavar == "SNAPSHOT":
        return "snapshots" if many else "snapshot"
    if metavar.startswith("TEMPLATE"):
        return "templates" if many else "template"
    if metavar in ("SRC", "DST"):
        return "files"
    return ""


def shapes(parser: argparse.ArgumentParser, path: str = ROOT) -> dict[str, CommandShape]:
    """Every command path (`mvm`, `mvm nodes`, `mvm snapshots rm`, aliases included) and its shape."""
    shape = CommandShape()
    found = {path: shape}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                shape.commands.append(name)
                found.update(shapes(sub, f"{path} {name}"))
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            shape.options += action.option_strings
            if action.nargs != 0:
                shape.valued += action.option_strings
                if action.choices:
                    for option in action.option_strings:
                        shape.choices[option] = [str(c) for c in action.choices]
        elif not shape.positionals:
            shape.positionals = _positional_kind(action)
    return found


def _words(values: list[str]) -> str:
    return shlex.quote(" ".join(values))


BASH_FUNCTION = r"""
_mvm() {
    local cur=$2 prev=$3 cmdpath=mvm base=0 npos=0 i word before kind key
    [[ -n ${ZSH_VERSION-} ]] && base=1
    for ((i = base + 1; i < base + COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        before=${COMP_WORDS[i-1]}
        [[ $word == -- ]] && return 0  # the rest is the command run in the sandbox
        [[ $word == -* ]] && continue
        [[ " ${_mvm_valued[$cmdpath]} " == *" $before "* ]] && continue
        if [[ " ${_mvm_commands[$cmdpath]} " == *" $word "* ]]; then
            cmdpath="$cmdpath $word"
            npos=0
        else
            ((npos++))
        fi
    done
    if [[ " ${_mvm_valued[$cmdpath]} " == *" $prev "* ]]; then
        key="$cmdpath $prev"
        COMPREPLY=($(compgen -W "${_mvm_choices[$key]}" -- "$cur"))
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_mvm_options[$cmdpath]}" -- "$cur"))
        return 0
    fi
    if [[ -n ${_mvm_commands[$cmdpath]} && $npos == 0 ]]; then
        COMPREPLY=($(compgen -W "${_mvm_commands[$cmdpath]}" -- "$cur"))
        return 0
    fi
    kind=${_mvm_positionals[$cmdpath]}
    case $kind in
        sandbox) ((npos == 0)) && COMPREPLY=($(compgen -W "$(mvm ls -q 2>/dev/null)" -- "$cur")) ;;
        sandboxes) COMPREPLY=($(compgen -W "$(mvm ls -q 2>/dev/null)" -- "$cur")) ;;
        snapshot) ((npos == 0)) && COMPREPLY=($(compgen -W "$(mvm snapshots ls -q 2>/dev/null)" -- "$cur")) ;;
        snapshots) COMPREPLY=($(compgen -W "$(mvm snapshots ls -q 2>/dev/null)" -- "$cur")) ;;
        template) ((npos == 0)) && COMPREPLY=($(compgen -W "$(mvm template ls -q 2>/dev/null)" -- "$cur")) ;;
        templates) COMPREPLY=($(compgen -W "$(mvm template ls -q 2>/dev/null)" -- "$cur")) ;;
        files) COMPREPLY=($(compgen -f -- "$cur")) ;;
        choice:*) ((npos == 0)) && COMPREPLY=($(compgen -W "${kind#choice:}" -- "$cur")) ;;
    esac
    return 0
}
"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion script: the parser's shape as associative arrays, and one function reading them."""
    tables = {"commands": [], "options": [], "valued": [], "positionals": [], "choices": []}
    for path, shape in shapes(parser).items():
        key = shlex.quote(path)
        tables["commands"].append(f"[{key}]={_words(shape.commands)}")
        tables["options"].append(f"[{key}]={_words(shape.options)}")
        tables["valued"].append(f"[{key}]={_words(shape.valued)}")
        tables["positionals"].append(f"[{key}]={shlex.quote(shape.positionals)}")
        for option, choices in shape.choices.items():
            tables["choices"].append(f"[{shlex.quote(path + ' ' + option)}]={_words(choices)}")
    lines = ["# mvm completion for bash, generated by `mvm completion bash`: source <(mvm completion bash)"]
    for name, entries in tables.items():
        lines.append(f"declare -gA _mvm_{name}=(\n    " + "\n    ".join(entries) + "\n)")
    return "\n".join(lines) + "\n" + BASH_FUNCTION + "complete -F _mvm mvm\n"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """The zsh completion script: the bash one, run by zsh's bash completion compatibility."""
    return (
        "# mvm completion for zsh, generated by `mvm completion zsh`: source <(mvm completion zsh) after compinit\n"
        "autoload -U +X compinit && { (( ${+_comps} )) || compinit; }\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser).split("\n", 1)[1]
    )


def register(sub) -> None:
    from mvm_cli.parsing import command_parser

    parser = command_parser(
        sub,
        "completion",
        "print a shell completion script",
        "source <(mvm completion bash)    # in ~/.bashrc; zsh: ~/.zshrc after compinit",
        description=__doc__,
    )
    parser.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    parser.set_defaults(handler=None)  # main prints it: it needs the whole parser
