"""The one error a template definition raises: a stable reason, a message, and where (line or key)."""

from __future__ import annotations

from dataclasses import dataclass

# Reasons are UPPER_SNAKE and stable: a service turns a DefinitionError into INVALID_ARGUMENT with an ErrorInfo
# whose reason is this and whose metadata is `DefinitionError.metadata()` (docs/templates.md lists them).
INVALID_DOCKERFILE = "INVALID_DOCKERFILE"  # malformed: no FROM first, missing arguments, bad quoting or JSON
UNSUPPORTED_INSTRUCTION = "UNSUPPORTED_INSTRUCTION"  # ADD, CMD, HEALTHCHECK, ONBUILD, a second FROM, heredocs, ...
UNSUPPORTED_FLAG = "UNSUPPORTED_FLAG"  # --mount, --platform, --from, --chmod, ...
UNSUPPORTED_DIRECTIVE = "UNSUPPORTED_DIRECTIVE"  # `# escape=`
INVALID_RECIPE = "INVALID_RECIPE"  # YAML that does not parse, an unknown key, a wrong type, a value out of bounds
INVALID_BASE = "INVALID_BASE"  # a FROM / `from:` that is neither a template name[:tag] nor an archive reference
INVALID_VARIABLE = "INVALID_VARIABLE"  # a `${...}` substitution that is malformed or not supported
UNKNOWN_BUILD_ARG = "UNKNOWN_BUILD_ARG"  # a build arg given that no ARG declares
COPY_OUTSIDE_CONTEXT = "COPY_OUTSIDE_CONTEXT"  # an absolute source, or one that leaves the context through `..`
SYMLINK_OUTSIDE_CONTEXT = "SYMLINK_OUTSIDE_CONTEXT"  # a symlink among what is read that points out of the context
COPY_SOURCE_NOT_FOUND = "COPY_SOURCE_NOT_FOUND"  # a source (or a wildcard) that matches nothing
UNSUPPORTED_FILE = "UNSUPPORTED_FILE"  # a device, FIFO or socket, or a file name that is not UTF-8
CONTEXT_TOO_LARGE = "CONTEXT_TOO_LARGE"  # more bytes or files read from the context than the limits allow
DEFINITION_TOO_LARGE = "DEFINITION_TOO_LARGE"  # the Dockerfile or recipe text, or its step count, beyond bounds

REASONS = frozenset(
    {
        INVALID_DOCKERFILE,
        UNSUPPORTED_INSTRUCTION,
        UNSUPPORTED_FLAG,
        UNSUPPORTED_DIRECTIVE,
        INVALID_RECIPE,
        INVALID_BASE,
        INVALID_VARIABLE,
        UNKNOWN_BUILD_ARG,
        COPY_OUTSIDE_CONTEXT,
        SYMLINK_OUTSIDE_CONTEXT,
        COPY_SOURCE_NOT_FOUND,
        UNSUPPORTED_FILE,
        CONTEXT_TOO_LARGE,
        DEFINITION_TOO_LARGE,
    }
)


class DefinitionError(Exception):
    """A template definition that cannot be built as written. Always the user's input, never our fault.

    `line` is the 1-based line of a Dockerfile instruction (its first line when continued) or of a recipe value;
    `key` is the recipe key path (`steps[2].copy.src`, `resources.vcpus`); `instruction` the Dockerfile keyword
    or recipe step kind involved. Any of them may be None when they do not apply.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        line: int | None = None,
        key: str | None = None,
        instruction: str | None = None,
    ) -> None:
        assert reason in REASONS, reason
        where = []
        if line is not None:
            where.append(f"line {line}")
        if key is not None:
            where.append(key)
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.reason = reason
        self.message = message
        self.line = line
        self.key = key
        self.instruction = instruction

    def metadata(self) -> dict[str, str]:
        """What an ErrorInfo carries beside the reason: only the fields that are set, as strings."""
        fields = {"line": self.line, "key": self.key, "instruction": self.instruction}
        return {name: str(value) for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Where:
    """Where an instruction came from (a Dockerfile line, a recipe key path), so every error about it says so."""

    line: int | None = None
    key: str | None = None
    instruction: str | None = None

    def error(self, reason: str, message: str, *, key: str | None = None) -> DefinitionError:
        return DefinitionError(reason, message, line=self.line, key=key or self.key, instruction=self.instruction)

    def __str__(self) -> str:
        return ", ".join(part for part in (self.line and f"line {self.line}", self.key) if part) or "-"
