"""E2B PTYs (`sandbox.pty`): our ExecInteractive with `pty`, kept by the gateway between the SDK's calls.

E2B's Start with a `pty` opens a terminal that outlives the stream that started it: input (SendInput,
StreamInput), resize (Update) and signals (SendSignal) come as separate calls naming its pid, and Connect
reattaches. Our background processes have no terminal, so a PTY is an ExecInteractive call that this module owns
(not the request that started it): each terminal is one task that feeds the call from a queue and fans its output
out to whoever follows it. It ends when its process ends (or its timeout, from the Start call's deadline, passes).

Bounds: at most MAX_PER_SANDBOX terminals per sandbox and caller; a follower that lets FOLLOWER_BACKLOG chunks pile
up is dropped (its stream ends `resource_exhausted`), so a stalled reader never holds output in the gateway.
A terminal is found by (caller's credential, sandbox, pid): sandbox names are per tenant, so the credential keeps one
tenant from reaching another's terminal through a sandbox of the same name. Terminals live in the gateway process
that started them; with several gateways behind a balancer, a pid is found only on that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from e2b_envd import process_pb2 as e2b

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.gateway.e2b.connect_protocol import ConnectError
from services.gateway.e2b.envd_events import TIMED_OUT, end_event
from services.gateway.e2b.sandbox_call import SandboxCall

MAX_PER_SANDBOX = 32
FOLLOWER_BACKLOG = 4096
_OVERFLOW = object()


@dataclass(eq=False)
class Terminal:
    pid: int
    argv: list[str]
    cwd: str
    tag: str
    envs: dict[str, str]
    requests: asyncio.Queue = field(default_factory=asyncio.Queue)
    followers: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None

    def send(self, request: api.ExecInteractiveRequest) -> None:
        self.requests.put_nowait(request)

    def follow(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=FOLLOWER_BACKLOG + 1)
        self.followers.add(queue)
        return queue

    def publish(self, event) -> None:
        for queue in list(self.followers):
            if queue.qsize() >= FOLLOWER_BACKLOG:
                self.followers.discard(queue)
                queue.put_nowait(_OVERFLOW)
            else:
                queue.put_nowait(event)


_terminals: dict[tuple, Terminal] = {}


def _key(call: SandboxCall, pid: int) -> tuple:
    return (call.metadata, call.sandbox, pid)


def find(call: SandboxCall, pid: int) -> Terminal | None:
    return _terminals.get(_key(call, pid))


def of_sandbox(call: SandboxCall) -> list[Terminal]:
    return [t for key, t in _terminals.items() if key[:2] == (call.metadata, call.sandbox)]


async def start(call: SandboxCall, process: api.ProcessConfig, tag: str) -> tuple[Terminal, asyncio.Queue]:
    """Opens the terminal and answers once its process started, with a follower queue subscribed before any output."""
    if len(of_sandbox(call)) >= MAX_PER_SANDBOX:
        raise ConnectError("resource_exhausted", f"at most {MAX_PER_SANDBOX} PTYs per sandbox are open at a time")
    terminal = Terminal(0, list(process.argv), process.cwd, tag, dict(process.env))
    first = terminal.follow()
    config = api.ExecInteractiveConfig(sandbox=f"sandboxes/{call.sandbox}", process=process)
    terminal.send(api.ExecInteractiveRequest(config=config))
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    terminal.task = asyncio.create_task(_run(call, terminal, started))
    try:
        terminal.pid = await started
    except BaseException:
        terminal.task.cancel()
        raise
    return terminal, first


async def _requests(terminal: Terminal) -> AsyncIterator[api.ExecInteractiveRequest]:
    while True:
        yield await terminal.requests.get()


async def _run(call: SandboxCall, terminal: Terminal, started: asyncio.Future) -> None:
    stub = sandbox_service_pb2_grpc.SandboxServiceStub(call.channel)
    stream = stub.ExecInteractive(_requests(terminal), metadata=call.metadata)
    ended = e2b.ProcessEvent(end=e2b.ProcessEvent.EndEvent(exit_code=-1, status="the terminal's stream ended"))
    try:
        async for response in stream:
            event = response.event
            which = event.WhichOneof("event")
            if which == "started":
                terminal.pid = event.started.pid
                _terminals[_key(call, terminal.pid)] = terminal
                started.set_result(event.started.pid)
            elif which in ("stdout", "stderr"):
                terminal.publish(e2b.ProcessEvent(data=e2b.ProcessEvent.DataEvent(pty=getattr(event, which))))
            elif which == "keepalive":
                terminal.publish(e2b.ProcessEvent(keepalive=e2b.ProcessEvent.KeepAlive()))
            elif which == "exited":
                ended = TIMED_OUT if event.exited.timed_out else end_event(event.exited)
                break
    except Exception as error:  # the call failed: before the start, that is the Start call's answer
        if not started.done():
            started.set_exception(ConnectError.from_grpc(error) if hasattr(error, "code") else error)
            return
        ended = e2b.ProcessEvent(end=e2b.ProcessEvent.EndEvent(exit_code=-1, status="error", error=str(error)))
    finally:
        stream.cancel()
        _terminals.pop(_key(call, terminal.pid), None)
    if not started.done():
        started.set_exception(ConnectError("internal", "the terminal ended before its process started"))
    terminal.publish(ended)
    terminal.publish(None)


async def events(terminal: Terminal, queue: asyncio.Queue) -> AsyncIterator[e2b.ProcessEvent]:
    """What one follower sees: output and keepalives, then the end event."""
    try:
        while (event := await queue.get()) is not None:
            if event is _OVERFLOW:
                raise ConnectError("resource_exhausted", "the terminal's output was not read fast enough")
            if isinstance(event, ConnectError):
                raise event
            yield event
    finally:
        terminal.followers.discard(queue)
