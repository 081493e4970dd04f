"""A sandbox's processes, E2B-style: `sandbox.commands.run/list/connect/kill/send_stdin` (async: `AsyncCommands`
here, sync: `Commands` in microvm_sandbox.commands_sync).

    async with AsyncSandbox.create() as sb:
        result = await sb.commands.run("ls -l /")                # to its end: an ExecResult
        web = await sb.commands.run("python3 -m http.server 8000", background=True, tag="web",
                                    on_stdout=lambda data: print(data.decode(), end=""))
        print(web.pid, [(p.pid, p.tag, p.running) for p in await sb.commands.list()])
        await web.kill()
        print((await web.wait()).signal)                          # 9

A background process belongs to the sandbox, not to the call that started it: it runs on when its handle is
dropped or the program ends, and `commands.connect(pid)` follows it again (from up to the newest 1 MiB of its
output, which the guest keeps). A foreground run is killed when its call is cancelled. Collecting calls keep at most
`max_output_bytes` of output (16 MiB by default, 0: no limit); `ExecResult.truncated` says when they dropped some.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, overload

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.command_handle import AsyncCommandHandle
from microvm_sandbox.errors import (
    InvalidArgumentError,
    ProcessNotFound,
    SandboxError,
)
from microvm_sandbox.models import MAX_OUTPUT_BYTES, ExecResult
from microvm_sandbox.output import OutputCallback

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox

GUEST_BUFFER = 1 << 20  # the newest output the guest keeps of each background process
MAX_INPUT = 1 << 20  # bytes of stdin per SendProcessInput call
KILL = 9


@dataclass
class ProcessInfo:
    """A background process as the guest describes it (`commands.list()`): running, or how it ended. `output_bytes`
    counts all it wrote (stdout and stderr); the guest keeps the newest 1 MiB of it."""

    pid: int
    tag: str
    argv: list[str]
    cwd: str
    running: bool
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    started_at: datetime | None = None
    output_bytes: int = 0
    envs: dict[str, str] = field(default_factory=dict)

    @property
    def cmd(self) -> str:
        """The command line, its words joined by spaces."""
        return " ".join(self.argv)

    @classmethod
    def of(cls, message: api.ProcessInfo) -> ProcessInfo:
        """The description of a ProcessInfo message."""
        ended = not message.running
        by_signal = ended and message.exited.WhichOneof("status") == "signal"
        started = message.start_time
        return cls(
            pid=message.pid,
            tag=message.tag,
            argv=list(message.argv),
            cwd=message.cwd,
            running=message.running,
            exit_code=message.exited.exit_code if ended and not by_signal else None,
            signal=message.exited.signal if by_signal else None,
            timed_out=ended and message.exited.timed_out,
            started_at=started.ToDatetime(UTC) if started.seconds or started.nanos else None,
            output_bytes=message.output_bytes,
        )


def process_config(
    cmd: str | Sequence[str], envs: dict[str, str] | None, cwd: str, user: str, timeout: float | None
) -> api.ProcessConfig:
    """The ProcessConfig of a command: a string runs through /bin/sh -c, a sequence is argv."""
    argv, shell = ([cmd], True) if isinstance(cmd, str) else (list(cmd), False)
    config = api.ProcessConfig(argv=argv, shell=shell, env=envs or {}, cwd=cwd, user=user)
    if timeout:
        config.timeout.FromNanoseconds(int(timeout * 1e9))
    return config


class AsyncCommands:
    """The processes of one sandbox (`sandbox.commands`): run in the foreground or the background, list, follow
    again, signal, feed stdin."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def sandbox_name(self) -> str:
        """`sandboxes/{id}` of the sandbox these processes run in."""
        return self._sandbox.name

    @property
    def client(self) -> Any:
        """The sandbox's AsyncClient."""
        return self._sandbox.client

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult: ...

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool | bytes = False,
        tag: str = "",
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> ExecResult | AsyncCommandHandle:
        """Runs `cmd` (a string through /bin/sh -c, a sequence as argv). Foreground (the default): to its end,
        returning its ExecResult (cancelling the call kills it). background=True: returns at once with an
        AsyncCommandHandle (pid, wait, kill, send_stdin...); the process runs on whatever happens to the handle.

        envs: added to the sandbox's environment. cwd, user: working directory and user (default /root, root).
        timeout: seconds before the process is killed (`timed_out`). stdin: bytes are fed to it, then its stdin is
        closed; True (background only) keeps its stdin open for `send_stdin`. tag: a name for a background process,
        shown by `list()`. on_stdout/on_stderr: called with each chunk as it arrives (plain or async functions).
        max_output_bytes: output kept for the result (default 16 MiB, 0: all); beyond it `truncated` is set.
        CommandNotFound when the program is missing; a non-zero exit is a result, not an error."""
        if not background:
            if stdin is True:
                raise InvalidArgumentError("stdin=True keeps stdin open for send_stdin: run it with background=True")
            if tag:
                raise InvalidArgumentError("a tag names a background process: run it with background=True")
            result: ExecResult = await self._sandbox.exec(
                cmd,
                env=envs,
                cwd=cwd,
                user=user,
                timeout=timeout,
                stdin=stdin or b"",
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                max_output_bytes=max_output_bytes,
            )
            return result
        info = await self.start(cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, stdin=bool(stdin), tag=tag)
        handle = AsyncCommandHandle(
            self,
            info.pid,
            info.tag,
            tail_bytes=GUEST_BUFFER,  # from its first byte (the guest keeps the newest 1 MiB)
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output_bytes=max_output_bytes,
        )
        if isinstance(stdin, bytes):
            await self.send_stdin(info.pid, stdin)
            await self.close_stdin(info.pid)
        return handle

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        timeout: float | None = None,
        stdin: bool = False,
        tag: str = "",
    ) -> ProcessInfo:
        """Starts `cmd` in the background without following it; returns it at once (`connect(pid)` follows it).
        Arguments as in `run`. QuotaExceededError (reason TOO_MANY_PROCESSES) when 64 already run."""
        request = api.StartProcessRequest(
            sandbox=self.sandbox_name, process=process_config(cmd, envs, cwd, user, timeout), tag=tag, stdin=stdin
        )
        return ProcessInfo.of((await self.client.call("StartProcess", request)).process)

    async def list(self) -> builtins.list[ProcessInfo]:
        """The background processes of the sandbox, running and the last 32 that ended, oldest first."""
        request = api.ListProcessesRequest(sandbox=self.sandbox_name)
        reply = await self.client.call("ListProcesses", request, idempotent=True)
        return [ProcessInfo.of(p) for p in reply.processes]

    async def get(self, pid: int) -> ProcessInfo:
        """One background process. ProcessNotFound when the sandbox has none with that pid."""
        for process in await self.list():
            if process.pid == pid:
                return process
        raise ProcessNotFound(
            f"no background process {pid}", code="NOT_FOUND", reason="PROCESS_NOT_FOUND", metadata={"pid": str(pid)}
        )

    async def _written(self, pid: int) -> int:
        """What the process wrote in all, when the guest still knows (0 otherwise)."""
        try:
            return (await self.get(pid)).output_bytes
        except SandboxError:
            return 0

    async def connect(
        self,
        pid: int,
        *,
        tail_bytes: int = 0,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> AsyncCommandHandle:
        """Follows a background process (running or ended) again: from up to `tail_bytes` of its newest output
        (0..1048576; 0: only what comes next), then live to its end. Any number of handles may follow one process.
        ProcessNotFound when the sandbox has none with that pid."""
        info = await self.get(pid)
        return AsyncCommandHandle(
            self,
            pid,
            info.tag,
            tail_bytes=tail_bytes,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output_bytes=max_output_bytes,
        )

    async def signal(self, pid: int, signal: int) -> ProcessInfo:
        """Sends `signal` (1..64) to a background process; returns it as it is then (a signal can be caught: it
        may still run). ProcessNotFound when there is no such process."""
        request = api.SignalProcessRequest(sandbox=self.sandbox_name, pid=pid, signal=signal)
        return ProcessInfo.of((await self.client.call("SignalProcess", request)).process)

    async def kill(self, pid: int) -> bool:
        """Kills a background process (SIGKILL). True when it was running, False when it had already ended.
        ProcessNotFound when there is no such process."""
        return (await self.signal(pid, KILL)).running

    async def send_stdin(self, pid: int, data: bytes | str) -> None:
        """Writes `data` (str: UTF-8) to the stdin of a background process started with stdin=True
        (FailedPreconditionError, reason PROCESS_STDIN_CLOSED, otherwise or once it was closed)."""
        payload = data.encode() if isinstance(data, str) else data
        for offset in range(0, len(payload), MAX_INPUT):
            request = api.SendProcessInputRequest(
                sandbox=self.sandbox_name, pid=pid, stdin=payload[offset : offset + MAX_INPUT]
            )
            await self.client.call("SendProcessInput", request)

    async def close_stdin(self, pid: int) -> None:
        """Closes the stdin of a background process (end of input: `cat` ends, for one)."""
        request = api.SendProcessInputRequest(sandbox=self.sandbox_name, pid=pid, close_stdin=True)
        await self.client.call("SendProcessInput", request)


__all__ = ["AsyncCommandHandle", "AsyncCommands", "ProcessInfo", "process_config"]
