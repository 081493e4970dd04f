"""The Dockerfile subset: text to instructions.

Supported: FROM (one stage), RUN (shell and exec forms), COPY (`--chown`, several sources, JSON form), ENV
(`K=V ...` and `K V`), WORKDIR, USER, ARG (before and after FROM). Comments are whole lines starting with `#`
(also inside a continued instruction); a line ending in `\\` continues on the next. Parser directives at the
top: `# syntax=` and `# check=` are ignored, `# escape=` is refused. Everything else is refused with its line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from images.definition.errors import (
    DEFINITION_TOO_LARGE,
    INVALID_DOCKERFILE,
    UNSUPPORTED_DIRECTIVE,
    UNSUPPORTED_FLAG,
    UNSUPPORTED_INSTRUCTION,
    DefinitionError,
    Where,
)
from images.definition.instructions import CopyArgs, Instruction
from images.definition.plan import Command
from images.definition.words import process_word, split_words

MAX_DOCKERFILE_BYTES = 1 << 20
MAX_INSTRUCTIONS = 1000
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DIRECTIVE = re.compile(r"#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*")
CONTINUATION = re.compile(r"\\[ \t]*$")
FLAG = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?(?:\s+|$)")
HEREDOC = re.compile(r"<<(?!<)-?[\"']?[A-Za-z_]")

# Why each refused instruction is refused, and what to do instead.
REFUSED = {
    "ADD": "use COPY (ADD's URLs, git sources and archive unpacking are not supported)",
    "CMD": "a sandbox has no default command; a recipe's `start` runs a command before the template snapshot",
    "ENTRYPOINT": "a sandbox has no entrypoint; a recipe's `start` runs a command before the template snapshot",
    "HEALTHCHECK": "use a recipe's `ready` check",
    "EXPOSE": "ports are exposed per sandbox (`mvm expose`)",
    "ONBUILD": "triggers are not supported",
    "VOLUME": "volumes are not supported",
    "LABEL": "use a recipe's `description`",
    "MAINTAINER": "use a recipe's `description`",
    "SHELL": "RUN's shell form always runs /bin/sh -c; use the exec form for another shell",
    "STOPSIGNAL": "not supported",
}


def raw_words(text: str) -> list[str]:
    """Words split on unquoted whitespace with quotes and escapes left in (Docker's name=value pre-split)."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quote != "'" and index + 1 < len(text):
            current.append(text[index : index + 2])
            index += 2
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char.isspace():
            if current:
                words.append("".join(current))
                current = []
            index += 1
            continue
        current.append(char)
        index += 1
    if current:
        words.append("".join(current))
    return words


def _flags(keyword: str, rest: str, where: Where, allowed: tuple[str, ...]) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        match = FLAG.match(rest)
        if not match:
            raise where.error(INVALID_DOCKERFILE, f"{keyword}: malformed flag in {rest.split()[0]!r}")
        name, value = match.group(1), match.group(2)
        if name not in allowed:
            raise where.error(UNSUPPORTED_FLAG, f"{keyword} --{name} is not supported")
        if value is None or value == "":
            raise where.error(INVALID_DOCKERFILE, f"{keyword} --{name} needs a value (--{name}=VALUE)")
        if name in flags:
            raise where.error(INVALID_DOCKERFILE, f"{keyword} --{name} is given twice")
        flags[name] = value
        rest = rest[match.end() :]
    return flags, rest


def _json_array(rest: str) -> list[str] | None:
    """The exec (JSON) form's strings, or None when `rest` is not a JSON array of strings (then it is shell form)."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _from(rest: str, where: Where) -> Instruction:
    _flags("FROM", rest, where, allowed=())

    def cook(variables: Mapping[str, str]) -> str:
        words = split_words(rest, variables, where)
        if len(words) == 3 and words[1].lower() == "as":
            raise where.error(UNSUPPORTED_INSTRUCTION, "FROM ... AS: multi-stage builds are not supported")
        if len(words) != 1:
            raise where.error(INVALID_DOCKERFILE, "FROM takes one base: a template name[:tag] or an archive")
        return words[0]

    return Instruction("FROM", where, cook)


def _run(rest: str, where: Where) -> Instruction:
    _flags("RUN", rest, where, allowed=())
    argv = _json_array(rest)
    if argv is not None:
        if not argv or not argv[0]:
            raise where.error(INVALID_DOCKERFILE, 'RUN\'s exec form needs a program: RUN ["program", "arg"]')
        command = Command(argv=tuple(argv))
    else:
        command = Command(shell=rest)
    return Instruction("RUN", where, lambda _variables: command)


def _copy(rest: str, where: Where) -> Instruction:
    flags, rest = _flags("COPY", rest, where, allowed=("chown",))

    def cook(variables: Mapping[str, str]) -> CopyArgs:
        array = _json_array(rest)
        words = (
            [process_word(item, variables, where) for item in array]
            if array is not None
            else split_words(rest, variables, where)
        )
        if len(words) < 2:
            raise where.error(INVALID_DOCKERFILE, "COPY needs at least one source and a destination")
        chown = process_word(flags["chown"], variables, where) if "chown" in flags else None
        return CopyArgs(tuple(words[:-1]), words[-1], chown)

    return Instruction("COPY", where, cook)


def _env(rest: str, where: Where) -> Instruction:
    words = raw_words(rest)

    def cook(variables: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        if "=" not in words[0]:
            # The old form: one name, and the rest of the line (spaces and all) its value.
            if len(words) < 2:
                raise where.error(INVALID_DOCKERFILE, f"ENV {words[0]} needs a value (ENV NAME=VALUE or NAME VALUE)")
            pairs = [(words[0], process_word(rest[len(words[0]) :].strip(), variables, where))]
        else:
            pairs = []
            for word in words:
                name, equals, value = word.partition("=")
                if not equals:
                    raise where.error(INVALID_DOCKERFILE, f"ENV: {word!r} is not NAME=VALUE")
                pairs.append((name, process_word(value, variables, where)))
        for name, _ in pairs:
            if not NAME.fullmatch(name):
                raise where.error(INVALID_DOCKERFILE, f"ENV: {name!r} is not a variable name")
        return tuple(pairs)

    return Instruction("ENV", where, cook)


def _arg(rest: str, where: Where) -> Instruction:
    words = raw_words(rest)

    def cook(variables: Mapping[str, str]) -> tuple[tuple[str, str | None], ...]:
        declared = []
        for word in words:
            name, equals, default = word.partition("=")
            if not NAME.fullmatch(name):
                raise where.error(INVALID_DOCKERFILE, f"ARG: {name!r} is not a variable name")
            declared.append((name, process_word(default, variables, where) if equals else None))
        return tuple(declared)

    return Instruction("ARG", where, cook)


def _word(keyword: str, rest: str, where: Where) -> Instruction:
    def cook(variables: Mapping[str, str]) -> str:
        value = process_word(rest, variables, where)
        if not value:
            raise where.error(INVALID_DOCKERFILE, f"{keyword} needs a value")
        return value

    return Instruction(keyword, where, cook)


def _instruction(line: int, text: str) -> Instruction:
    keyword, rest = re.fullmatch(r"(\S+)\s*(.*)", text.strip(), re.DOTALL).groups()
    keyword, rest = keyword.upper(), rest.strip()
    where = Where(line=line, instruction=keyword)
    if keyword in REFUSED:
        raise where.error(UNSUPPORTED_INSTRUCTION, f"{keyword} is not supported: {REFUSED[keyword]}")
    if keyword not in ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "ARG"):
        raise where.error(UNSUPPORTED_INSTRUCTION, f"unknown instruction {keyword[:40]!r}")
    if not rest:
        raise where.error(INVALID_DOCKERFILE, f"{keyword} needs arguments")
    if keyword in ("RUN", "COPY") and any(HEREDOC.search(word) for word in raw_words(rest) if word[0] not in "'\""):
        raise where.error(UNSUPPORTED_INSTRUCTION, f"{keyword} with a heredoc (<<WORD) is not supported")
    if keyword == "FROM":
        return _from(rest, where)
    if keyword == "RUN":
        return _run(rest, where)
    if keyword == "COPY":
        return _copy(rest, where)
    if keyword == "ENV":
        return _env(rest, where)
    if keyword == "ARG":
        return _arg(rest, where)
    return _word(keyword, rest, where)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) of each instruction: directives, comments and blank lines dropped."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCKERFILE_BYTES:
        raise DefinitionError(DEFINITION_TOO_LARGE, f"the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes")
    out: list[tuple[int, str]] = []
    directives = True
    current: list[str] | None = None
    start = 0
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as Docker skips it
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        stripped = line.strip()
        if directives:
            match = DIRECTIVE.fullmatch(stripped)
            if match and match.group(1).lower() == "escape":
                raise DefinitionError(
                    UNSUPPORTED_DIRECTIVE,
                    "the escape directive is not supported: the escape character is always \\",
                    line=number,
                )
            if match and match.group(1).lower() in ("syntax", "check"):
                continue  # names a BuildKit frontend or its checks: this parser is its own frontend
            directives = False
        if current is None:
            if not stripped or stripped.startswith("#"):
                continue
            current, start = [], number
        elif not stripped or stripped.startswith("#"):
            continue  # comments and blank lines inside a continued instruction are dropped, as Docker does
        continued = CONTINUATION.search(line)
        if continued:
            current.append(line[: continued.start()])
            continue
        current.append(line)
        out.append((start, "".join(current)))
        current = None
        if len(out) > MAX_INSTRUCTIONS:
            raise DefinitionError(DEFINITION_TOO_LARGE, f"more than {MAX_INSTRUCTIONS} instructions", line=number)
    if current is not None and "".join(current).strip():
        out.append((start, "".join(current)))
    return out


def parse_dockerfile(text: str) -> list[Instruction]:
    """The Dockerfile's instructions in order; DefinitionError naming the line of the first one refused."""
    return [_instruction(line, joined) for line, joined in logical_lines(text)]
