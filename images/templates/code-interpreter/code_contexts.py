"""Contexts: one Jupyter kernel each (jupyter_client's AsyncKernelManager and AsyncKernelClient), and running code in
one while streaming what the kernel emits as events (dicts, see mvm_code_server's protocol).

Runs under the guest image's python3 (Debian bookworm: jupyter_client 7.4) as well as a newer jupyter_client 8.
"""

import asyncio
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

CHART_MIME = "application/vnd.mvm.chart+json"
TABLE_MIME = "application/vnd.mvm.table+json"
KERNEL_DISPLAY = Path(__file__).with_name("kernel_display.py")
# Loads kernel_display.py into a new Python kernel without touching the user's sys.path or leaving names behind.
PYTHON_STARTUP = f"""
import importlib.util as _mvm_util
_mvm_spec = _mvm_util.spec_from_file_location("mvm_kernel_display", {str(KERNEL_DISPLAY)!r})
_mvm_module = _mvm_util.module_from_spec(_mvm_spec)
_mvm_spec.loader.exec_module(_mvm_module)
_mvm_module.install(get_ipython())
del _mvm_util, _mvm_spec, _mvm_module
"""
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
POLL_SECONDS = 0.2  # how often a run waiting on the kernel checks that it is still alive
INTERRUPT_GRACE_SECONDS = 5.0  # after a timeout's interrupt, how long the kernel has to finish the cell
START_TIMEOUT_SECONDS = 60.0


class Refused(Exception):
    """A request refused before anything ran; `name` is the protocol's error name."""

    def __init__(self, name: str, value: str, **extra):
        super().__init__(value)
        self.name, self.value, self.extra = name, value, extra


def installed_kernels() -> dict[str, str]:
    """language -> kernelspec name, for every installed kernelspec (`python` is always ipykernel's `python3`)."""
    kernels = {}
    for name, found in sorted(KernelSpecManager().get_all_specs().items()):
        language = found["spec"].get("language", name).lower()
        kernels.setdefault(language, name)
    if "python" in kernels or "python3" in KernelSpecManager().find_kernel_specs():
        kernels["python"] = "python3"
    return kernels


@dataclass
class Context:
    id: str
    language: str
    kernel_name: str
    cwd: str
    env: dict[str, str]
    manager: AsyncKernelManager | None = None
    client: object = None
    dead: bool = False  # the kernel died: the next run starts a fresh one
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd, "env": self.env}

    async def start(self) -> None:
        self.manager = AsyncKernelManager(kernel_name=self.kernel_name)
        await self.manager.start_kernel(cwd=self.cwd, env={**os.environ, **self.env})
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=START_TIMEOUT_SECONDS)
        self.dead = False
        if self.language == "python":
            await self._execute_quietly(PYTHON_STARTUP)

    async def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.manager is not None:
            try:
                await self.manager.shutdown_kernel(now=True)
            except Exception:  # a kernel already gone: nothing more to stop
                pass
        self.manager = self.client = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def interrupt(self) -> None:
        if self.manager is not None and not self.dead:
            await self.manager.interrupt_kernel()

    def exit_code(self):
        process = getattr(getattr(self.manager, "provisioner", None), "process", None)
        return process.poll() if process is not None else None

    async def _execute_quietly(self, code: str) -> None:
        msg_id = self.client.execute(code, silent=True, store_history=False)
        reply = await self._shell_reply(msg_id, START_TIMEOUT_SECONDS)
        if reply is None or reply["content"].get("status") != "ok":
            raise RuntimeError(f"kernel start-up code failed in context {self.id}: {reply and reply['content']}")

    async def _shell_reply(self, msg_id: str, timeout: float):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = await self.client.get_shell_msg(timeout=min(left, POLL_SECONDS))
            except Empty:
                if not await self.manager.is_alive():
                    return None
                continue
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return reply
        return None

    async def run(self, code: str, timeout: float | None, max_output_bytes: int):
        """Runs `code`, yielding events; the last is `end`. Callers hold `self.lock`."""
        restarted = False
        if self.dead or self.manager is None:
            await self.restart()
            restarted = True
        output = OutputBound(max_output_bytes)
        # stop_on_error=False: runs are one at a time, nothing is queued to abort; with True, ipykernel 6 aborts
        # requests that come in just after an error (the next run, from a fast client)
        msg_id = self.client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        status, execution_count, timed_out = "ok", None, False
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                if timed_out:  # the interrupt did not end the cell within its grace
                    break
                timed_out, status = True, "timeout"
                await self.manager.interrupt_kernel()
                deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                yield error_event(
                    "TimeoutError",
                    f"the code ran past its timeout of {timeout:g} s and was interrupted; the context keeps its state",
                )
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(deadline - time.monotonic(), 0))
            try:
                message = await self.client.get_iopub_msg(timeout=wait)
            except Empty:
                if not await self.manager.is_alive():
                    self.dead, status = True, "kernel_died"
                    yield error_event(
                        "KernelDied",
                        f"the {self.language} kernel of context {self.id!r} died (exit code {self.exit_code()}) while "
                        "running this code; its state is lost and the next run in this context starts a fresh kernel",
                    )
                    break
                continue
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue  # start-up code, or a cell an earlier timeout left behind
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "execute_input":
                execution_count = content.get("execution_count")
            elif timed_out and kind == "error":
                continue  # the KeyboardInterrupt of our own interrupt: the TimeoutError said it
            elif kind == "error":
                status = "error"
                yield error_event(content.get("ename", ""), content.get("evalue", ""), content.get("traceback", []))
            else:
                event = output_event(kind, content)
                if event is not None and output.admit(event):
                    yield event
        if status != "kernel_died":
            reply = await self._shell_reply(msg_id, 1.0 if status == "timeout" else 5.0)
            if reply is not None:
                execution_count = reply["content"].get("execution_count", execution_count)
                if reply["content"].get("status") == "aborted":
                    status = "error"
                    yield error_event("ExecutionAborted", "the kernel aborted this run without running it")
        end = {"type": "end", "execution_count": execution_count, "status": status}
        if restarted:
            end["restarted"] = True
        if output.truncated:
            end["truncated"] = True
        yield end


def error_event(name: str, value: str, traceback=()) -> dict:
    return {"type": "error", "name": name, "value": value, "traceback": [ANSI.sub("", line) for line in traceback]}


def output_event(kind: str, content: dict):
    if kind == "stream":
        return {"type": "stderr" if content.get("name") == "stderr" else "stdout", "text": content.get("text", "")}
    if kind in ("execute_result", "display_data"):
        data = dict(content.get("data", {}))
        event = {"type": "result", "is_main_result": kind == "execute_result"}
        chart, table = data.pop(CHART_MIME, None), data.pop(TABLE_MIME, None)
        event["data"] = data
        if chart is not None:
            event["chart"] = chart
        if table is not None:
            event["table"] = table
        return event
    return None


class OutputBound:
    """What one run may send: stdout, stderr and results together, in bytes of their JSON text. A stream that
    crosses the bound is cut at it; a result that does not fit is dropped; then everything is dropped."""

    def __init__(self, limit: int):
        self.left = limit
        self.truncated = False

    def admit(self, event: dict) -> bool:
        if self.truncated:
            return False
        if event["type"] in ("stdout", "stderr"):
            text = event["text"]
            size = len(text.encode())
            if size > self.left:
                event["text"] = text.encode()[: self.left].decode(errors="ignore")
                self.truncated, self.left = True, 0
                return bool(event["text"])
        else:
            size = len(json.dumps(event))
            if size > self.left:
                self.truncated, self.left = True, 0
                return False
        self.left -= size
        return True


class Contexts:
    """Every context of this server by id, and the default one of each language."""

    def __init__(self, default_cwd: str):
        self.default_cwd = default_cwd
        self.kernels = installed_kernels()
        self.by_id: dict[str, Context] = {}

    def languages(self) -> list[str]:
        return sorted(self.kernels)

    def _kernel_for(self, language: str) -> str:
        kernel = self.kernels.get(language.lower())
        if kernel is None:
            installed = self.languages()
            raise Refused(
                "unknown_language",
                f"no kernel for language {language!r}; installed: {', '.join(installed)}",
                languages=installed,
            )
        return kernel

    async def create(self, language="python", cwd=None, env=None, context_id=None) -> Context:
        language = (language or "python").lower()
        kernel = self._kernel_for(language)
        if env is not None and not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise Refused("bad_request", "env must map names to strings")
        cwd = cwd or self.default_cwd
        if not os.path.isdir(cwd):
            raise Refused("bad_request", f"cwd {cwd!r} is not a directory")
        context = Context(context_id or uuid.uuid4().hex[:12], language, kernel, cwd, dict(env or {}))
        self.by_id[context.id] = context
        try:
            await context.start()
        except BaseException:
            self.by_id.pop(context.id, None)
            await context.stop()
            raise
        return context

    def get(self, context_id: str) -> Context:
        context = self.by_id.get(context_id)
        if context is None:
            raise Refused("context_not_found", f"no context {context_id!r}")
        return context

    async def default(self, language: str) -> Context:
        language = (language or "python").lower()
        self._kernel_for(language)
        context_id = "default" if language == "python" else f"default-{language}"
        return self.by_id.get(context_id) or await self.create(language, context_id=context_id)

    async def delete(self, context_id: str) -> None:
        context = self.get(context_id)
        del self.by_id[context_id]
        await context.stop()

    async def close(self) -> None:
        contexts, self.by_id = list(self.by_id.values()), {}
        await asyncio.gather(*(context.stop() for context in contexts), return_exceptions=True)
