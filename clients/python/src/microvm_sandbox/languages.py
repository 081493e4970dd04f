"""`run_code`'s languages: which interpreter runs a language, and one exec that checks it is installed first.

The check is `command -v` in the same process that then runs the code (one round trip): when the interpreter is
missing, the wrapper writes a marker line on stderr and exits 127, which the SDK turns into `CommandNotFound`
naming the language and the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

from microvm_sandbox.errors import CommandNotFound, InvalidArgumentError
from microvm_sandbox.models import ExecResult


@dataclass(frozen=True)
class Language:
    """A language's interpreter and how it takes a program as an argument (`python3 -c CODE`)."""

    name: str
    interpreter: str
    flag: str


_LANGUAGES = (
    Language("python", "python3", "-c"),
    Language("bash", "bash", "-c"),
    Language("sh", "sh", "-c"),
    Language("javascript", "node", "-e"),
    Language("ruby", "ruby", "-e"),
    Language("perl", "perl", "-e"),
)
_BY_NAME = {language.name: language for language in _LANGUAGES}
ALIASES: dict[str, Language] = {
    **_BY_NAME,
    "python3": _BY_NAME["python"],
    "py": _BY_NAME["python"],
    "shell": _BY_NAME["sh"],
    "js": _BY_NAME["javascript"],
    "node": _BY_NAME["javascript"],
    "nodejs": _BY_NAME["javascript"],
    "rb": _BY_NAME["ruby"],
    "pl": _BY_NAME["perl"],
}
MISSING_MARKER = "microvm-sandbox: interpreter not found"
# $1 interpreter, $2 marker, then the interpreter's arguments. `exec` keeps one process: signals, exit status and
# the guest's pid are the interpreter's own.
_WRAPPER = 'command -v "$1" >/dev/null 2>&1 || { printf "%s\\n" "$2" >&2; exit 127; }; i=$1; shift 2; exec "$i" "$@"'


def language(name: str) -> Language:
    """The language called `name` or one of its aliases (case-insensitive); InvalidArgumentError otherwise."""
    found = ALIASES.get(name.strip().lower())
    if found is None:
        raise InvalidArgumentError(
            f"unsupported language {name!r}; supported: {', '.join(sorted(ALIASES))}",
            code="INVALID_ARGUMENT",
            reason="UNSUPPORTED_LANGUAGE",
            metadata={"language": name},
        )
    return found


def argv(lang: Language, code: str) -> list[str]:
    """The one process that checks for the interpreter and runs `code` with it."""
    return ["sh", "-c", _WRAPPER, "run_code", lang.interpreter, MISSING_MARKER, lang.flag, code]


def checked(lang: Language, result: ExecResult) -> ExecResult:
    """`result`, unless it says the interpreter was missing: then CommandNotFound."""
    if result.exit_code == 127 and result.stderr.decode(errors="replace").strip() == MISSING_MARKER:
        raise CommandNotFound(
            f"cannot run {lang.name}: its interpreter `{lang.interpreter}` is not installed in the sandbox "
            f"(install it in the template, or use another language)",
            code="NOT_FOUND",
            reason="COMMAND_NOT_FOUND",
            metadata={"language": lang.name, "interpreter": lang.interpreter},
        )
    return result
