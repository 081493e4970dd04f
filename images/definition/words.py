"""Variable substitution and word splitting, as Docker's shell lexer does them (not a shell: no globbing,
no command substitution, no arithmetic).

Substitution: `$NAME`, `${NAME}`, `${NAME:-default}` (default when unset or empty), `${NAME-default}` (when
unset), `${NAME:+alternative}` (when set and not empty), `${NAME+alternative}` (when set); an unset name is the
empty string; `\\$` is a literal `$`. The word inside a default or alternative is itself substituted.

Dockerfile words also know quotes: '...' is literal, "..." substitutes and knows `\\"`, `\\\\`, `\\$`; outside
quotes a backslash escapes the next character and unquoted whitespace separates words. Recipe values are not
quoted text (YAML already said where the string ends): they get substitution only.
"""

from __future__ import annotations

from collections.abc import Mapping

from images.definition.errors import INVALID_DOCKERFILE, INVALID_VARIABLE, Where

NAME_START = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
NAME_CHARS = NAME_START + "0123456789"
WHITESPACE = " \t\r\n\f\v"


class _Scanner:
    def __init__(self, text: str, variables: Mapping[str, str], where: Where, *, quotes: bool) -> None:
        self.text = text
        self.pos = 0
        self.variables = variables
        self.where = where
        self.quotes = quotes

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def words(self, *, split: bool) -> list[str]:
        """The text's words (or, unsplit, the whole text as one word), quotes removed and variables substituted."""
        words: list[str] = []
        current: list[str] = []
        in_word = False
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if split and char in WHITESPACE:
                if in_word:
                    words.append("".join(current))
                    current, in_word = [], False
                self.pos += 1
                continue
            in_word = True
            if char == "\\":
                following = self.peek(1)
                if following == "$" or (self.quotes and following):
                    current.append(following)
                    self.pos += 2
                else:
                    current.append(char)
                    self.pos += 1
            elif self.quotes and char == "'":
                end = self.text.find("'", self.pos + 1)
                if end < 0:
                    raise self.where.error(INVALID_DOCKERFILE, f"unterminated single quote in {self.text!r}")
                current.append(self.text[self.pos + 1 : end])
                self.pos = end + 1
            elif self.quotes and char == '"':
                current.append(self.double_quoted())
            elif char == "$":
                current.append(self.variable())
            else:
                current.append(char)
                self.pos += 1
        if in_word or not split:
            words.append("".join(current))
        return words

    def double_quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\" and self.peek(1) in ('"', "\\", "$"):
                out.append(self.peek(1))
                self.pos += 2
            elif char == "$":
                out.append(self.variable())
            else:
                out.append(char)
                self.pos += 1
        raise self.where.error(INVALID_DOCKERFILE, f"unterminated double quote in {self.text!r}")

    def variable(self) -> str:
        """At a `$`: the substituted value, or a literal `$` when no name follows."""
        self.pos += 1
        char = self.peek()
        if char == "{":
            return self.braced()
        if char and char in NAME_START:
            start = self.pos
            while self.peek() and self.peek() in NAME_CHARS:
                self.pos += 1
            return self.variables.get(self.text[start : self.pos], "")
        return "$"

    def braced(self) -> str:
        self.pos += 1
        start = self.pos
        while self.peek() and self.peek() in NAME_CHARS:
            self.pos += 1
        name = self.text[start : self.pos]
        if not name or name[0] not in NAME_START:
            raise self.where.error(INVALID_VARIABLE, f"a variable name must follow '${{' in {self.text!r}")
        value = self.variables.get(name)
        if self.peek() == "}":
            self.pos += 1
            return value or ""
        operator = self.peek()
        colon = operator == ":"
        if colon:
            self.pos += 1
            operator = self.peek()
        if operator not in ("-", "+"):
            shown = (":" if colon else "") + (operator or "end of text")
            raise self.where.error(
                INVALID_VARIABLE, f"${{{name}{shown}...}} is not supported (use ${{NAME:-default}} or ${{NAME:+alt}})"
            )
        self.pos += 1
        word = self.nested_word()
        is_set = value is not None and (value != "" or not colon)
        if operator == "-":
            return value if is_set else word
        return word if is_set else ""

    def nested_word(self) -> str:
        """The word of a ${NAME:-word}, up to the matching `}`, itself substituted."""
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "}":
                self.pos += 1
                return "".join(out)
            if char == "\\" and self.peek(1) in ("}", "$", "\\"):
                out.append(self.peek(1))
                self.pos += 2
            elif char == "$":
                out.append(self.variable())
            else:
                out.append(char)
                self.pos += 1
        raise self.where.error(INVALID_VARIABLE, f"missing '}}' in {self.text!r}")


def split_words(text: str, variables: Mapping[str, str], where: Where) -> list[str]:
    """Dockerfile words: split on unquoted whitespace, quotes removed, variables substituted."""
    return _Scanner(text, variables, where, quotes=True).words(split=True)


def process_word(text: str, variables: Mapping[str, str], where: Where) -> str:
    """One Dockerfile word (WORKDIR, USER, an ENV value of the `ENV K V` form): quotes removed, substituted."""
    return _Scanner(text, variables, where, quotes=True).words(split=False)[0]


def expand(text: str, variables: Mapping[str, str], where: Where) -> str:
    """A recipe value: variables substituted, `\\$` a literal `$`, nothing else special."""
    return _Scanner(text, variables, where, quotes=False).words(split=False)[0]
