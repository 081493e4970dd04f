"""The sandbox tools a model calls by name (run_code, exec, read_file, write_file, list_files): their JSON Schemas
and their execution, in one place for every vendor; `openai_tools` and `anthropic_tools` only wrap them in each
vendor's shapes.

`SandboxTools.call(name, arguments)` never raises for what a model got wrong (an unknown tool, a missing or
mistyped argument) nor for what the sandbox refused: the answer is an `Outcome` with `is_error` and a sentence
the model can act on.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from microvm_integrations.execution import (
    MAX_OUTPUT_CHARS,
    CodeSession,
    Image,
    Outcome,
    exec_outcome,
    resolve,
    run_sync,
)
from microvm_sandbox.errors import SandboxError


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, what it does (the model reads this) and its arguments as JSON Schema."""

    name: str
    description: str
    parameters: dict[str, Any]


def _schema(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


TOOLS = (
    ToolSpec(
        "run_code",
        "Run code in a stateful Jupyter kernel inside an isolated Linux sandbox. Variables, imports and functions "
        "persist between calls (per language). Returns stdout, stderr, the value of the last expression, and the "
        "error with its traceback if it raised. Matplotlib figures come back as images and as chart data.",
        _schema(
            ["code"],
            code={"type": "string", "description": "The code to run, like a notebook cell."},
            language={
                "type": "string",
                "description": "`python` (default), `bash`, `javascript`, or another language the sandbox has.",
            },
        ),
    ),
    ToolSpec(
        "exec",
        "Run a shell command (/bin/sh -c) in the sandbox as a new process and return its stdout, stderr and exit "
        "code. Use it for package installs, git, or programs; use run_code for stateful Python.",
        _schema(
            ["command"],
            command={"type": "string", "description": "The shell command line."},
            cwd={"type": "string", "description": "Absolute working directory; default: the sandbox's."},
        ),
    ),
    ToolSpec(
        "read_file",
        "Read a file in the sandbox. Text comes back as text, PNG and JPEG images as images.",
        _schema(["path"], path={"type": "string", "description": "Absolute path of the file."}),
    ),
    ToolSpec(
        "write_file",
        "Write a text file in the sandbox, replacing it if it exists; missing parent directories are made.",
        _schema(
            ["path", "content"],
            path={"type": "string", "description": "Absolute path of the file."},
            content={"type": "string", "description": "The whole new content."},
        ),
    ),
    ToolSpec(
        "list_files",
        "List a directory in the sandbox: one entry per line, directories end with `/`, files show their size.",
        _schema(["path"], path={"type": "string", "description": "Absolute path of the directory, e.g. /home/user."}),
    ),
)
TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict}
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def tool_specs(names: list[str] | None = None) -> list[ToolSpec]:
    """The tools named (all of them by default), in their usual order; KeyError for an unknown name."""
    return list(TOOLS) if names is None else [TOOLS_BY_NAME[name] for name in names]


def parse_arguments(raw: Any) -> dict[str, Any]:
    """A tool call's arguments: a JSON object as text (OpenAI) or already a mapping (Anthropic). ValueError, in
    words for the model, when they are not an object."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"the arguments are not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"the arguments must be a JSON object, not {type(raw).__name__}")
    return raw


def check_arguments(spec: ToolSpec, arguments: dict[str, Any]) -> None:
    """ValueError naming the first argument that is missing, unknown or of the wrong type."""
    properties = spec.parameters["properties"]
    for name in spec.parameters["required"]:
        if name not in arguments:
            raise ValueError(f"missing required argument `{name}` (takes: {', '.join(properties)})")
    for name, value in arguments.items():
        if name not in properties:
            raise ValueError(f"unknown argument `{name}` (takes: {', '.join(properties)})")
        wanted = properties[name]["type"]
        if not isinstance(value, _JSON_TYPES[wanted]) or (wanted != "boolean" and isinstance(value, bool)):
            raise ValueError(f"argument `{name}` must be a {wanted}, not {type(value).__name__}")


class SandboxTools:
    """Executes the tools on one sandbox (sync `Sandbox` or `AsyncSandbox`). run_code keeps its state in code
    contexts of this object's own; `timeout` bounds each run_code and exec (seconds)."""

    def __init__(self, sandbox: Any, *, timeout: float | None = 300.0, max_read_chars: int = MAX_OUTPUT_CHARS):
        self.sandbox, self.timeout, self.max_read_chars = sandbox, timeout, max_read_chars
        self.session = CodeSession(sandbox, timeout=timeout)

    def call(self, name: str, arguments: Any) -> Outcome:
        """Runs tool `name` with `arguments` (JSON text or a mapping) on a sync Sandbox."""
        return run_sync(self.acall(name, arguments))

    async def acall(self, name: str, arguments: Any) -> Outcome:
        """Runs tool `name` with `arguments` (JSON text or a mapping); awaits an AsyncSandbox."""
        spec = TOOLS_BY_NAME.get(name)
        if spec is None:
            return Outcome(f"error: unknown tool `{name}`; the tools are: {', '.join(TOOLS_BY_NAME)}", is_error=True)
        try:
            args = parse_arguments(arguments)
            check_arguments(spec, args)
        except ValueError as error:
            return Outcome(f"error: {name}: {error}", is_error=True)
        try:
            return await getattr(self, "_" + name)(**args)
        except SandboxError as error:
            return Outcome(f"error: {name}: {error.code}: {error.message}", is_error=True, exit_code=1)

    async def _run_code(self, code: str, language: str = "python") -> Outcome:
        return await self.session.run(code, language)

    async def _exec(self, command: str, cwd: str = "") -> Outcome:
        return exec_outcome(await resolve(self.sandbox.exec(command, cwd=cwd, timeout=self.timeout)))

    async def _read_file(self, path: str) -> Outcome:
        data = await resolve(self.sandbox.read(path))
        for magic, media_type in _IMAGE_MAGIC.items():
            if data.startswith(magic):
                image = Image(media_type, base64.b64encode(data).decode())
                return Outcome(f"[{media_type} image, {len(data)} bytes: {path}]", [image])
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return Outcome(f"[{path} is a binary file of {len(data)} bytes; not shown]")
        if len(text) > self.max_read_chars:
            rest = len(text) - self.max_read_chars
            return Outcome(text[: self.max_read_chars] + f"\n[... {rest} more characters not shown]")
        return Outcome(text)

    async def _write_file(self, path: str, content: str) -> Outcome:
        await resolve(self.sandbox.write(path, content))
        return Outcome(f"wrote {len(content.encode())} bytes to {path}")

    async def _list_files(self, path: str) -> Outcome:
        entries = await resolve(self.sandbox.ls(path))
        lines = []
        for entry in sorted(entries, key=lambda entry: entry.path):
            name = entry.path.rstrip("/").rsplit("/", 1)[-1] or entry.path
            lines.append(f"{name}/" if entry.is_dir else f"{name}  {entry.size} bytes")
        return Outcome("\n".join(lines) if lines else f"{path} is empty")

    def close(self) -> None:
        """Deletes the code contexts (sync Sandbox)."""
        run_sync(self.session.close())

    async def aclose(self) -> None:
        """Deletes the code contexts (AsyncSandbox)."""
        await self.session.close()
