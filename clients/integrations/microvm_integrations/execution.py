"""What every adapter shares: code run in contexts of the adapter's own (state kept between calls), and a run's
outcome as the text and images a model reads.

The adapters take a sync `Sandbox` or an `AsyncSandbox` alike. Their logic is written once, as coroutines that
`await resolve(...)` each sandbox call: with an AsyncSandbox they are awaited as usual; with a sync Sandbox no call
returns an awaitable, so the coroutine never suspends and `run_sync` drives it to its end without an event loop
(so a sync adapter also works where a loop is already running, e.g. in Jupyter).
"""

from __future__ import annotations

import base64
import inspect
import json
import re
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from microvm_sandbox.errors import (
    CodeContextNotFound,
    FailedPreconditionError,
    InvalidArgumentError,
    UnimplementedError,
)

T = TypeVar("T")

# Names a model or a framework gives a language, to the kernel language they mean.
KERNEL_LANGUAGES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
    "javascript": "javascript",
    "js": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
}
TIMEOUT_EXIT_CODE = 124  # what `timeout(1)` and AutoGen's command-line executors report for a timeout
MAX_OUTPUT_CHARS = 20_000  # a model's context is the bound, not the sandbox's
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Jupyter colours its tracebacks


async def resolve(value: T | Awaitable[T]) -> T:
    """`value`, awaited when it is awaitable (an AsyncSandbox's answer), as is otherwise (a sync Sandbox's)."""
    if inspect.isawaitable(value):
        return await value
    return value


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that never suspends (every sandbox call it made was a sync Sandbox's)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise TypeError("this sandbox is asynchronous (AsyncSandbox): call the adapter's async method instead")


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """`obj[name]` for a mapping, `obj.name` otherwise: vendors' payloads arrive as dicts or as their SDK's objects."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclass
class Image:
    """An image a run produced: its MIME type and its bytes as base64."""

    media_type: str
    data: str

    @property
    def size(self) -> int:
        return len(self.data) * 3 // 4 - self.data[-2:].count("=")


@dataclass
class Outcome:
    """A run as a model reads it: text (output, results, error), the images among the results, whether it
    failed, and an exit code in the shell's sense (0 ok, 1 error, 124 timeout)."""

    text: str
    images: list[Image] = field(default_factory=list)
    is_error: bool = False
    exit_code: int = 0


def _base64(data: str | bytes | None) -> str:
    if not data:
        return ""
    return base64.b64encode(data).decode() if isinstance(data, bytes) else data


def _clip(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters not shown]"


def execution_outcome(execution: Any) -> Outcome:
    """An SDK `Execution` as an Outcome: stdout, stderr, each result's text (an image as a note naming it, a chart
    as its data so a model reads a plot without vision), then the error with its traceback."""
    parts = ["".join(execution.logs.stdout), "".join(execution.logs.stderr)]
    images = []
    for result in execution.results:
        shown = len(images)
        for kind, media_type in (("png", "image/png"), ("jpeg", "image/jpeg")):
            data = _base64(getattr(result, kind, None))
            if data:
                images.append(Image(media_type, data))
                parts.append(f"[{media_type} image, {images[-1].size} bytes]\n")
        chart = getattr(result, "chart", None)
        if chart:
            parts.append("chart: " + _clip(json.dumps(chart, default=str), 4000) + "\n")
        text = result.text or result.markdown or ("" if len(images) > shown or chart else result.html)
        if text:
            parts.append(text if text.endswith("\n") else text + "\n")
    status = getattr(execution, "status", "ok")
    error = execution.error
    if getattr(execution, "restarted", False):  # the server started a fresh kernel after one died
        parts.insert(0, "[the kernel had died and was restarted for this run: earlier state is lost]\n")
    if getattr(execution, "truncated", False):
        parts.append("[output truncated: the run wrote more than the sandbox keeps]\n")
    if error is not None:
        trace = _ANSI.sub("", error.traceback or "").rstrip()
        parts.append(trace + "\n" if trace else f"{error.name}: {error.value}\n")
    if status == "timeout":
        parts.append("[the run timed out and was interrupted; the context keeps its state]\n")
    elif status == "kernel_died":
        parts.append("[the kernel died: its state is lost, the next run starts a fresh one]\n")
    failed = error is not None or status in ("error", "timeout", "kernel_died")
    exit_code = TIMEOUT_EXIT_CODE if status == "timeout" else int(failed)
    return Outcome(_clip("".join(parts)), images, failed, exit_code)


def exec_outcome(result: Any) -> Outcome:
    """An SDK `ExecResult` (a process) as an Outcome: stdout, stderr, and how it ended when not with 0."""
    text = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    if result.timed_out:
        text += "[timed out: the process was killed]\n"
        exit_code = TIMEOUT_EXIT_CODE
    elif result.exit_code is None:
        exit_code = 128 + (result.signal or 0)
        text += f"[killed by signal {result.signal}]\n"
    else:
        exit_code = result.exit_code
        if exit_code:
            text += f"[exit code {exit_code}]\n"
    if result.truncated:
        text += f"[output truncated: {result.output_bytes} bytes written in all]\n"
    return Outcome(_clip(text), is_error=exit_code != 0, exit_code=exit_code)


class CodeSession:
    """Runs code in code contexts of its own, one per language, created on first use (and again when it was
    deleted behind its back); a language the sandbox has no kernel for (or a sandbox without the code server)
    runs each call as a fresh process instead (`run_script`), so its state does not carry over."""

    def __init__(self, sandbox: Any, *, timeout: float | None = None, cwd: str | None = None) -> None:
        self.sandbox, self.timeout, self.cwd = sandbox, timeout, cwd
        self.contexts: dict[str, Any] = {}
        self.scripts: set[str] = set()  # languages run as processes

    async def run(self, code: str, language: str = "python", timeout: float | None = None) -> Outcome:
        """Runs `code`; the sandbox's refusals (SandboxError) propagate."""
        timeout = self.timeout if timeout is None else timeout
        kernel = KERNEL_LANGUAGES.get(language.strip().lower(), language.strip().lower())
        context = None if kernel in self.scripts else await self._context(kernel)
        if context is None:
            return exec_outcome(await resolve(self.sandbox.run_script(language, code, timeout=timeout)))
        try:
            execution = await resolve(self.sandbox.run_code(code, language=kernel, context=context, timeout=timeout))
        except CodeContextNotFound:  # deleted behind our back (by someone else, or the sandbox was restored)
            self.contexts.pop(kernel, None)
            context = await self._context(kernel)
            execution = await resolve(self.sandbox.run_code(code, language=kernel, context=context, timeout=timeout))
        return execution_outcome(execution)

    async def _context(self, kernel: str) -> Any:
        if kernel not in self.contexts:
            try:
                self.contexts[kernel] = await resolve(self.sandbox.create_code_context(language=kernel, cwd=self.cwd))
            except (InvalidArgumentError, FailedPreconditionError, UnimplementedError):
                self.scripts.add(kernel)  # no kernel for it here: run_script says whether it can run at all
                return None
        return self.contexts[kernel]

    async def restart(self) -> None:
        """Fresh kernels for every context: variables and imports are gone."""
        for context in self.contexts.values():
            await resolve(self.sandbox.restart_code_context(context))

    async def close(self) -> None:
        """Deletes the session's contexts (their kernels stop); a later run makes new ones."""
        contexts, self.contexts = list(self.contexts.values()), {}
        for context in contexts:
            try:
                await resolve(self.sandbox.delete_code_context(context))
            except CodeContextNotFound:
                pass
