"""A context backed by a Jupyter kernel (jupyter_client's AsyncKernelManager and AsyncKernelClient): running code in
it while streaming what the kernel emits as events (dicts, see mvm_code_server's protocol).

Runs under the guest image's python3 (Debian bookworm: jupyter_client 7.4) as well as a newer jupyter_client 8.
"""

import ast
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

from context_base import (
    INTERRUPT_GRACE_SECONDS,
    Context,
    OutputBound,
    Refused,
    end_event,
    error_event,
    timeout_event,
)
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

CHART_MIME = "application/vnd.mvm.chart+json"
TABLE_MIME = "application/vnd.mvm.table+json"
KERNEL_MODULES = [Path(__file__).with_name(name) for name in ("kernel_display.py", "kernel_messages.py")]
# Loads kernel_display.py (MIME formatters) and kernel_messages.py (a shorter message path per cell) into a new Python
# kernel without touching the user's sys.path or leaving names behind.
PYTHON_STARTUP = f"""
import importlib.util as _mvm_util
for _mvm_path in {[str(path) for path in KERNEL_MODULES]!r}:
    _mvm_spec = _mvm_util.spec_from_file_location("mvm_" + _mvm_path.rsplit("/", 1)[-1][:-3], _mvm_path)
    _mvm_module = _mvm_util.module_from_spec(_mvm_spec)
    _mvm_spec.loader.exec_module(_mvm_module)
    _mvm_module.install(get_ipython())
del _mvm_util, _mvm_path, _mvm_spec, _mvm_module
"""
# A new kernel's first cells are several times slower than later ones (lazy imports and first uses in IPython's
# display and output paths): the server runs these before any user does, so a context answers at full speed from its
# first run, and a template snapshot taken after the default context started carries them already done. A value, so
# the display path runs; store_history=False, so the execution count stays at 1; WARM_CLEANUP then puts back what
# IPython's display hook changed (`_`, `__`, `___`, `_N`, `Out`): warm-up runs only in a new kernel.
WARM_CELLS = ("print(end='')\n2", "3", "None")
WARM_CLEANUP = """
def _mvm_clean(shell):
    shell.push({"_": "", "__": "", "___": ""}, interactive=False)  # as IPython starts them (hidden from %who)
    shell.displayhook._ = shell.displayhook.__ = shell.displayhook.___ = ""
    for name in [name for name in shell.user_ns if name[:1] == "_" and name[1:].isdigit()]:
        del shell.user_ns[name]
        shell.user_ns_hidden.pop(name, None)
    shell.user_ns["_oh"].clear()
_mvm_clean(get_ipython())
del _mvm_clean
"""
# Kernel options. The sqlite history (a file write per cell, and a thread) is off: In, Out and %history of the
# running kernel still work from memory.
KERNEL_ARGUMENTS = ["--HistoryManager.enabled=False"]
SOCKET_DIR = Path(os.environ.get("MVM_CODE_KERNEL_DIR", "/run/mvm-code"))
POLL_SECONDS = 0.2  # how often a run waiting on the kernel checks that it is still alive
START_TIMEOUT_SECONDS = 60.0
ENV_RESTORE_WAIT_SECONDS = 5.0  # how long a run waits for the kernel to restore a per-run env


def installed_kernels() -> dict[str, str]:
    """language -> kernelspec name, for every installed kernelspec (`python` is always ipykernel's `python3`)."""
    kernels = {}
    for name, found in sorted(KernelSpecManager().get_all_specs().items()):
        language = found["spec"].get("language", name).lower()
        kernels.setdefault(language, name)
    if "python" in kernels or "python3" in KernelSpecManager().find_kernel_specs():
        kernels["python"] = "python3"
    return kernels


def python_env_swap(env: dict[str, str]) -> str:
    """An expression that sets `env` in the kernel's os.environ and evaluates to the JSON of the values it replaced
    (null: was unset). An expression, so it runs as a user_expression: nothing is left in the user's namespace."""
    return (
        "__import__('json').dumps([{name: __import__('os').environ.get(name) for name in "
        f"{sorted(env)!r}}}, __import__('os').environ.update({env!r})][0])"
    )


def python_env_restore(saved: dict) -> str:
    """A statement that puts back the values python_env_swap reported, and unsets those that were unset."""
    values = {name: value for name, value in saved.items() if value is not None}
    unset = sorted(name for name, value in saved.items() if value is None)
    return (
        f"(lambda environ: (environ.update({values!r}), [environ.pop(name, None) for name in {unset!r}]))"
        "(__import__('os').environ)"
    )


@dataclass
class JupyterContext(Context):
    kernel_name: str = "python3"
    manager: AsyncKernelManager | None = None
    client: object = None
    dead: bool = False  # the kernel died: the next run starts a fresh one
    used: bool = False  # a user's code ran in this kernel: warming it would reset its `_` and Out

    def check_env(self, env: dict[str, str]) -> None:
        if env and self.language != "python":
            raise Refused("bad_request", f"a per-run env is not supported for {self.language} kernels")

    async def start(self) -> None:
        self.manager = kernel_manager(self.kernel_name, self.id)
        await self.manager.start_kernel(cwd=self.cwd, env={**os.environ, **self.env}, extra_arguments=KERNEL_ARGUMENTS)
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=START_TIMEOUT_SECONDS)
        self.dead = self.used = False
        if self.language == "python":
            await self._execute_quietly(PYTHON_STARTUP)
            await self.warm()

    async def warm(self) -> None:
        if self.used or self.dead or self.manager is None:
            return
        for cell in WARM_CELLS:
            async for _event in self._execute(cell, START_TIMEOUT_SECONDS, OutputBound(1 << 20), store_history=False):
                pass
        await self._execute_quietly(WARM_CLEANUP)

    async def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.manager is not None:
            try:
                await self.manager.shutdown_kernel(now=True)
            except Exception:  # a kernel already gone: nothing more to stop
                pass
        self.manager = self.client = None

    async def interrupt(self) -> None:
        if self.manager is not None and not self.dead:
            await self.manager.interrupt_kernel()

    def exit_code(self):
        process = getattr(getattr(self.manager, "provisioner", None), "process", None)
        return process.poll() if process is not None else None

    async def _execute_quietly(self, code: str, user_expressions=None, timeout=START_TIMEOUT_SECONDS) -> dict:
        """Runs code that the user does not see: no execute_input, no execution_count, no history."""
        msg_id = self.client.execute(code, silent=True, store_history=False, user_expressions=user_expressions or {})
        reply = await self._shell_reply(msg_id, timeout)
        if reply is None or reply["content"].get("status") != "ok":
            raise RuntimeError(f"the server's own code failed in context {self.id}: {reply and reply['content']}")
        return reply["content"]

    async def _swap_env(self, env: dict[str, str]) -> dict:
        content = await self._execute_quietly("", {"saved": python_env_swap(env)})
        saved = content.get("user_expressions", {}).get("saved", {})
        if saved.get("status") != "ok":
            raise RuntimeError(f"could not set the run's env in context {self.id}: {saved}")
        return json.loads(ast.literal_eval(saved["data"]["text/plain"]))

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

    async def run(self, code: str, timeout: float | None, max_output_bytes: int, env=None):
        """Runs `code`, yielding events; the last is `end`. Callers hold `self.lock`."""
        restarted = False
        if self.dead or self.manager is None:
            await self.restart()
            restarted = True
        self.used = True
        saved = await self._swap_env(env) if env else None
        output = OutputBound(max_output_bytes)
        try:
            status, execution_count = "ok", None
            async for event in self._execute(code, timeout, output):
                if event["type"] == "end":
                    status, execution_count = event["status"], event["execution_count"]
                else:
                    yield event
        finally:
            if saved is not None and not self.dead:
                # queued behind the cell if it still runs; no run of this context can start before it
                msg_id = self.client.execute(python_env_restore(saved), silent=True, store_history=False)
                await self._shell_reply(msg_id, ENV_RESTORE_WAIT_SECONDS)
        yield end_event(execution_count, status, restarted, output)

    async def _execute(self, code: str, timeout: float | None, output: OutputBound, store_history: bool = True):
        # stop_on_error=False: runs are one at a time, nothing is queued to abort; with True, ipykernel 6 aborts
        # requests that come in just after an error (the next run, from a fast client)
        msg_id = self.client.execute(code, store_history=store_history, allow_stdin=False, stop_on_error=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        status, execution_count, timed_out = "ok", None, False
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                if timed_out:  # the interrupt did not end the cell within its grace
                    break
                timed_out, status = True, "timeout"
                await self.manager.interrupt_kernel()
                deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                yield timeout_event(timeout)
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
                continue  # the server's quiet code, or a cell an earlier timeout left behind
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "execute_input":  # none from our Python kernels (kernel_messages.py): the reply has the count
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
        yield {"type": "end", "execution_count": execution_count, "status": status}


def kernel_manager(kernel_name: str, context_id: str) -> AsyncKernelManager:
    """A manager whose kernel listens on unix sockets in a directory only the server's user can enter, instead of
    TCP ports on loopback that every process in the guest can reach. That is also why its messages go unsigned: no
    other user can send one, and the HMAC of every message is a cost under TCG for nothing."""
    SOCKET_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    SOCKET_DIR.chmod(0o700)
    manager = AsyncKernelManager(kernel_name=kernel_name, transport="ipc")
    manager.ip = str(SOCKET_DIR / f"kernel-{os.getpid()}-{hashlib.sha256(context_id.encode()).hexdigest()[:12]}")
    manager.session.key = b""
    return manager


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
