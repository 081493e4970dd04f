"""Argument parsing shared by every `mvm` command: the help format, global options, values (KEY=VALUE, 30m),
and the split of a command line at the remote command, so options work anywhere before it.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from collections.abc import Sequence

DEFAULT_GATEWAY = "127.0.0.1:50051"
JSON_HELP = "print JSON (protobuf's JSON mapping) instead of text"
GLOBAL_HELP = {
    "--gateway": "gateway address (env MVM_GATEWAY)",
    "--debug": "print the Python traceback of an error",
}


class CliError(Exception):
    """A mistake the user can fix, printed as `mvm: <message>` (exit status `status`)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's default shown when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, "", [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


def global_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (`mvm --debug ls`, `mvm ls --debug`).
    SUPPRESS defaults: a command's parser never overwrites what the top-level parser read."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", default=argparse.SUPPRESS, metavar="HOST:PORT", help=GLOBAL_HELP["--gateway"])
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=GLOBAL_HELP["--debug"])
    return common


def command_parser(sub, name: str, help: str, example: str, description: str = "", **kwargs) -> argparse.ArgumentParser:
    """A command's parser: its help line, a description, and an example shown by `-h`."""
    return sub.add_parser(
        name,
        help=help,
        description=_wrapped(description or help[:1].upper() + help[1:] + "."),
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=HelpFormatter,
        parents=[global_options()],
        allow_abbrev=False,
        **kwargs,
    )


def _wrapped(text: str) -> str:
    """A one-paragraph description wrapped to the help's width; one with line breaks kept as written."""
    return text if "\n" in text else textwrap.fill(text, 100)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def add_listing(parser: argparse.ArgumentParser, what: str = "ids", keep: bool = False) -> None:
    """--json, --quiet/-q and --no-headers of a listing command. `keep`: on a sub-command of a parser that has
    them too (`snapshots ls`), do not overwrite what the parent read."""
    defaults = {"default": argparse.SUPPRESS} if keep else {}
    parser.add_argument("--json", action="store_true", help=JSON_HELP, **defaults)
    parser.add_argument("--quiet", "-q", action="store_true", help=f"print only {what}", **defaults)
    parser.add_argument("--no-headers", action="store_true", help="leave out the table's header row", **defaults)


def parse_pairs(pairs: Sequence[str] | None, what: str) -> dict[str, str]:
    """{"K": "V"} from ["K=V", ...]; CliError naming `what` for an item without `=`."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {pair!r} is not KEY=VALUE")
        result[key] = value
    return result


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d`, or a combination such as `1h30m`. For argparse `type=`."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    match = _DURATION.fullmatch(value)
    if not value or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or e.g. 90s, 30m, 2h, 1h30m")
    return sum(int(amount) * unit for amount, unit in zip(match.groups(), _UNITS.values(), strict=True) if amount)


def format_duration(seconds: float) -> str:
    """`1h30m`, `45s`, `2d3h` (the largest two units, rounded down)."""
    seconds = int(max(seconds, 0))
    parts = []
    for unit, size in _UNITS.items():
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def gateway_default() -> str:
    return os.environ.get("MVM_GATEWAY", DEFAULT_GATEWAY)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def split_remote_command(
    parser: argparse.ArgumentParser, tokens: list[str], positionals: int
) -> tuple[list[str], list[str]]:
    """Splits a command's tokens (after its name) into its own arguments and the remote command.

    Everything after the first `--` is the remote command; without `--`, the remote command starts at the first
    word that is neither an option (with its value) nor one of the command's `positionals` (e.g. the sandbox
    id). So `mvm exec ID --env K=V -- cmd`, `mvm exec --env K=V ID cmd -x` and `mvm exec ID cmd` all work."""
    options = parser._option_string_actions  # argparse's own table of the parser's option strings
    head: list[str] = []
    seen = 0
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":
            return head, tokens[index + 1 :]
        if token.startswith("-") and token != "-":
            head.append(token)
            index += 1
            name = token.split("=", 1)[0]
            action = options.get(name)
            if action is None and not token.startswith("--") and len(token) > 2:
                action = options.get(token[:2])  # -n3: the value is attached
                if action is not None and _takes_value(action):
                    continue
            if action is not None and _takes_value(action) and "=" not in token and index < len(tokens):
                head.append(tokens[index])
                index += 1
            continue
        if seen < positionals:
            head.append(token)
            seen += 1
            index += 1
            continue
        return head, tokens[index:]
    return head, []


def find_command(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """The index in argv of the command name (the first word that is not a global option or its value)."""
    options = parser._option_string_actions
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            return None
        if token.startswith("-"):
            action = options.get(token.split("=", 1)[0])
            index += 2 if action is not None and _takes_value(action) and "=" not in token else 1
            continue
        return index
    return None
