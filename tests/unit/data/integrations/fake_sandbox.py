"""A stand-in for the SDK's Sandbox with the surface the integrations use (run_code and code contexts, run_script,
exec, write/read/ls), answering with the SDK's own types, for the adapters' unit tests: Python "kernels" are
namespaces in this process (state per context, the last expression's value as the main result, `display({...})`
and `plot(xs, ys)` for rich results, `die()` for a kernel that dies); run_script and exec are real host processes;
files live in a dict. `AsyncFakeSandbox` is the same behind coroutines that suspend."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import itertools
import json
import subprocess
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from microvm_sandbox import CodeContext, Execution, ExecutionError, Logs, Result, languages
from microvm_sandbox.errors import CodeContextNotFound, InvalidArgumentError, NotFoundError
from microvm_sandbox.models import ExecResult, FileEntry

# A 1x1 PNG: what a matplotlib figure's result carries, much smaller.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _figure(xs: list[float], ys: list[float], title: str) -> Result:
    """A line plot's result as the code server sends it: the image, chart data and a text form."""
    points = [[x, y] for x, y in zip(xs, ys, strict=True)]
    chart = {
        "type": "line",
        "title": title,
        "x_label": "",
        "y_label": "",
        "elements": [{"label": "", "points": points}],
    }
    return Result(text="<Figure size 640x480 with 1 Axes>", png=PNG, chart=chart)


class FakeSandbox:
    def __init__(self, kernels: tuple[str, ...] = ("python",)) -> None:
        self.kernels = kernels
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, Any]] = []
        self.dead: set[str] = set()  # contexts whose kernel died
        self._ids = itertools.count(1)

    # --- code ---------------------------------------------------------------------------------------------
    def create_code_context(self, language: str = "python", cwd: str | None = None, envs: Any = None) -> CodeContext:
        self.calls.append(("create_code_context", language))
        if language not in self.kernels:
            raise InvalidArgumentError(f"no kernel for {language!r}; installed: {', '.join(self.kernels)}")
        context = CodeContext(f"ctx-{next(self._ids)}", language, cwd or "/home/user")
        self.namespaces[context.id] = {}
        return context

    def restart_code_context(self, context: CodeContext) -> CodeContext:
        self.calls.append(("restart_code_context", context.id))
        self.namespaces[context.id] = {}
        return context

    def delete_code_context(self, context: CodeContext) -> None:
        self.calls.append(("delete_code_context", context.id))
        if self.namespaces.pop(context.id, None) is None:
            raise CodeContextNotFound(f"no code context {context.id}", code="NOT_FOUND")

    def run_code(self, code: str, language: str = "python", context: CodeContext | None = None, **_: Any) -> Execution:
        self.calls.append(("run_code", code))
        if context is None or context.id not in self.namespaces:
            raise CodeContextNotFound(f"no code context {getattr(context, 'id', None)}", code="NOT_FOUND")
        execution = Execution(execution_count=len(self.calls), status="ok", context=context.id)
        if context.id in self.dead:  # the code server starts a fresh kernel for the run after one died
            self.dead.discard(context.id)
            self.namespaces[context.id], execution.restarted = {}, True
        namespace = self.namespaces[context.id]
        namespace["display"] = lambda formats: execution.results.append(Result(**formats))
        namespace["die"] = lambda: (setattr(execution, "status", "kernel_died"), self.dead.add(context.id))
        namespace["plot"] = lambda xs, ys, title="": execution.results.append(_figure(xs, ys, title))
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            tree = ast.parse(code)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                exec(compile(tree, "<cell>", "exec"), namespace)
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace) if last else None
            if value is not None:
                execution.results.append(Result(is_main_result=True, text=repr(value)))
        except Exception as error:
            trace = "\x1b[0;31m" + "".join(traceback.format_exception(error)) + "\x1b[0m"
            execution.error = ExecutionError(type(error).__name__, str(error), trace)
            execution.status = "error"
        execution.logs = Logs(
            [stdout.getvalue()] if stdout.getvalue() else [], [stderr.getvalue()] * bool(stderr.getvalue())
        )
        return execution

    def run_script(self, language: str, code: str, *, timeout: float | None = None, **_: Any) -> ExecResult:
        self.calls.append(("run_script", language))
        lang = languages.language(language)
        return self._process([lang.interpreter, lang.flag, code], timeout)

    # --- processes and files ------------------------------------------------------------------------------
    def exec(self, command: str, *, cwd: str = "", timeout: float | None = None, **_: Any) -> ExecResult:
        self.calls.append(("exec", command))
        return self._process(["sh", "-c", command], timeout)

    def _process(self, argv: list[str], timeout: float | None) -> ExecResult:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as expired:
            return ExecResult(expired.stdout or b"", expired.stderr or b"", None, 9, timed_out=True)
        return ExecResult(done.stdout, done.stderr, done.returncode)

    def write(self, path: str, data: bytes | str, **_: Any) -> None:
        self.files[path] = data.encode() if isinstance(data, str) else data

    def read(self, path: str) -> bytes:
        if path not in self.files:
            raise NotFoundError(f"{path}: no such file or directory", code="NOT_FOUND")
        return self.files[path]

    def ls(self, path: str = "/") -> list[FileEntry]:
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix) :].split("/", 1)[0] for p in self.files if p.startswith(prefix)}
        if not names:
            raise NotFoundError(f"{path}: no such file or directory", code="NOT_FOUND")
        entries = []
        for name in names:
            full = prefix + name
            size = len(self.files.get(full, b""))
            entries.append(FileEntry(full, full not in self.files, size, 0o644))
        return entries


class AsyncFakeSandbox:
    """FakeSandbox's methods as coroutines that really suspend, as an AsyncSandbox's do."""

    def __init__(self, inner: FakeSandbox) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return method(*args, **kwargs)

        return call


def recorded(name: str) -> Any:
    """A recorded vendor payload of this directory (`openai_chat_completion`, `anthropic_message`, ...)."""
    return json.loads((Path(__file__).parent / f"{name}.json").read_text())


def as_objects(value: Any, keep: frozenset[str] = frozenset({"input"})) -> Any:
    """A payload as the vendors' SDKs hand it over: objects with attributes (mappings under `keep` stay dicts, as
    Anthropic's `ToolUseBlock.input` does)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: v if k in keep else as_objects(v, keep) for k, v in value.items()})
    if isinstance(value, list):
        return [as_objects(item, keep) for item in value]
    return value
