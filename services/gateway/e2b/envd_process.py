"""E2B's `process.Process` service, translated onto our background processes and terminals.

- Start without a `pty`: StartProcess (a background process: it runs on when the SDK's stream goes away, as in
  envd, and `Connect-Timeout-Ms`, the command's `timeout`, becomes its own timeout, after which it is killed, as
  envd does) and then ConnectProcess from the start of its output buffer (the newest 1 MiB: output a command wrote
  before we follow it, in the moment between the two calls, is replayed from there).
- Start with a `pty`: a terminal (envd_terminals.py, our ExecInteractive).
- Connect: ConnectProcess from now on (envd replays nothing either), or the terminal's output.
- List: the running background processes and terminals. SendInput, StreamInput, CloseStdin: SendProcessInput (or
  the terminal's stdin). SendSignal: SignalProcess (or the terminal's). Update: the terminal's resize.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from e2b_envd import process_pb2 as e2b
from google.protobuf.duration_pb2 import Duration

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from services.gateway.e2b import envd_terminals as terminals
from services.gateway.e2b.connect_protocol import ConnectError, ConnectRequest
from services.gateway.e2b.envd_events import TIMED_OUT, process_event
from services.gateway.e2b.envd_users import absolute, user_from_basic_auth
from services.gateway.e2b.sandbox_call import SandboxCall

REPLAY_BYTES = 1 << 20  # all a background process's buffer holds
INPUT_CHUNK = 1 << 20  # SendProcessInput takes at most this much per call
RPC_SECONDS = 30.0  # the deadline of a unary call on our API when the SDK set none


def _stub(call: SandboxCall) -> sandbox_service_pb2_grpc.SandboxServiceStub:
    return sandbox_service_pb2_grpc.SandboxServiceStub(call.channel)


def _sandbox(call: SandboxCall) -> str:
    return f"sandboxes/{call.sandbox}"


def our_process(config: e2b.ProcessConfig, rpc: ConnectRequest) -> api.ProcessConfig:
    if not config.cmd:
        raise ConnectError("invalid_argument", "process.cmd must name a program")
    user = user_from_basic_auth(rpc.headers.get("Authorization"))
    process = api.ProcessConfig(argv=[config.cmd, *config.args], env=dict(config.envs), user=user)
    if config.HasField("cwd") and config.cwd:
        process.cwd = absolute(config.cwd, user, "process.cwd")
    if rpc.timeout:
        process.timeout.CopyFrom(Duration(seconds=int(rpc.timeout), nanos=int(rpc.timeout % 1 * 1e9)))
    return process


async def start(request: e2b.StartRequest, rpc: ConnectRequest, call: SandboxCall) -> AsyncIterator:
    process = our_process(request.process, rpc)
    if request.HasField("pty"):
        process.pty = True
        process.terminal_size.cols, process.terminal_size.rows = request.pty.size.cols, request.pty.size.rows
        terminal, queue = await terminals.start(call, process, request.tag)
        yield e2b.StartResponse(event=e2b.ProcessEvent(start=e2b.ProcessEvent.StartEvent(pid=terminal.pid)))
        async for event in terminals.events(terminal, queue):
            yield e2b.StartResponse(event=event)
        return
    started = await _stub(call).StartProcess(
        api.StartProcessRequest(
            sandbox=_sandbox(call),
            process=process,
            tag=request.tag,
            # envd keeps stdin open unless told otherwise (older SDKs send nothing).
            stdin=request.stdin if request.HasField("stdin") else True,
        ),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    )
    pid = started.process.pid
    yield e2b.StartResponse(event=e2b.ProcessEvent(start=e2b.ProcessEvent.StartEvent(pid=pid)))
    async for event in _follow(call, pid, REPLAY_BYTES, rpc.timeout):
        yield e2b.StartResponse(event=event)


async def connect(request: e2b.ConnectRequest, rpc: ConnectRequest, call: SandboxCall) -> AsyncIterator:
    pid = await _pid(call, request.process)
    if terminal := terminals.find(call, pid):
        queue = terminal.follow()
        yield e2b.ConnectResponse(event=e2b.ProcessEvent(start=e2b.ProcessEvent.StartEvent(pid=pid)))
        async for event in terminals.events(terminal, queue):
            yield e2b.ConnectResponse(event=event)
        return
    yield e2b.ConnectResponse(event=e2b.ProcessEvent(start=e2b.ProcessEvent.StartEvent(pid=pid)))
    async for event in _follow(call, pid, 0, rpc.timeout):
        yield e2b.ConnectResponse(event=event)


async def _follow(call: SandboxCall, pid: int, tail_bytes: int, timeout: float | None) -> AsyncIterator:
    stream = _stub(call).ConnectProcess(
        api.ConnectProcessRequest(sandbox=_sandbox(call), pid=pid, tail_bytes=tail_bytes),
        metadata=call.metadata,
        timeout=timeout,
    )
    try:
        async for response in stream:
            if response.event.exited.timed_out:
                raise TIMED_OUT
            if (event := process_event(response.event)) is not None:
                yield event
            if response.event.HasField("exited"):
                return
    finally:
        stream.cancel()


async def _running(call: SandboxCall) -> list[api.ProcessInfo]:
    listed = await _stub(call).ListProcesses(
        api.ListProcessesRequest(sandbox=_sandbox(call)), metadata=call.metadata, timeout=RPC_SECONDS
    )
    return [p for p in listed.processes if p.running]


async def _pid(call: SandboxCall, selector: e2b.ProcessSelector) -> int:
    """The pid a selector names, checked: a pid or tag of no running process or terminal is not_found."""
    which = selector.WhichOneof("selector")
    if which is None:
        raise ConnectError("invalid_argument", "process: name a pid or a tag")
    open_terminals = terminals.of_sandbox(call)
    if which == "pid" and any(t.pid == selector.pid for t in open_terminals):
        return selector.pid
    if which == "tag" and (found := [t.pid for t in open_terminals if t.tag == selector.tag]):
        return found[0]
    for process in await _running(call):
        if (which == "pid" and process.pid == selector.pid) or (which == "tag" and process.tag == selector.tag):
            return process.pid
    named = f"pid {selector.pid}" if which == "pid" else f"tag {selector.tag!r}"
    raise ConnectError("not_found", f"process with {named} not found")


async def list_processes(request: e2b.ListRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.ListResponse:
    reply = e2b.ListResponse()
    for process in await _running(call):
        info = reply.processes.add(pid=process.pid)
        info.config.cmd, info.config.cwd = (process.argv[0] if process.argv else ""), process.cwd
        info.config.args.extend(process.argv[1:])
        if process.tag:
            info.tag = process.tag
    for terminal in terminals.of_sandbox(call):
        info = reply.processes.add(pid=terminal.pid)
        info.config.cmd = terminal.argv[0] if terminal.argv else ""
        info.config.args.extend(terminal.argv[1:])
        info.config.envs.update(terminal.envs)
        if terminal.cwd:
            info.config.cwd = terminal.cwd
        if terminal.tag:
            info.tag = terminal.tag
    return reply


async def _send(call: SandboxCall, pid: int, data: bytes) -> None:
    if terminal := terminals.find(call, pid):
        terminal.send(api.ExecInteractiveRequest(stdin=data))
        return
    for offset in range(0, max(len(data), 1), INPUT_CHUNK):
        await _stub(call).SendProcessInput(
            api.SendProcessInputRequest(sandbox=_sandbox(call), pid=pid, stdin=data[offset : offset + INPUT_CHUNK]),
            metadata=call.metadata,
            timeout=RPC_SECONDS,
        )


def _input_bytes(given: e2b.ProcessInput) -> bytes:
    which = given.WhichOneof("input")
    if which is None:
        raise ConnectError("invalid_argument", "input: give stdin or pty bytes")
    return getattr(given, which)


async def send_input(request: e2b.SendInputRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.SendInputResponse:
    await _send(call, await _pid(call, request.process), _input_bytes(request.input))
    return e2b.SendInputResponse()


async def stream_input(messages: AsyncIterator, rpc: ConnectRequest, call: SandboxCall) -> e2b.StreamInputResponse:
    """Input in order: a `start` naming the process, then `data` events (keepalives are skipped)."""
    pid = None
    async for message in messages:
        which = message.WhichOneof("event")
        if which == "start":
            pid = await _pid(call, message.start.process)
        elif which == "data":
            if pid is None:
                raise ConnectError("invalid_argument", "StreamInput: the first event must be start")
            await _send(call, pid, _input_bytes(message.data.input))
    return e2b.StreamInputResponse()


async def send_signal(request: e2b.SendSignalRequest, rpc: ConnectRequest, call: SandboxCall):
    if request.signal not in (e2b.SIGNAL_SIGKILL, e2b.SIGNAL_SIGTERM):
        raise ConnectError("invalid_argument", "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
    pid = await _pid(call, request.process)
    if terminal := terminals.find(call, pid):
        terminal.send(api.ExecInteractiveRequest(signal=int(request.signal)))
    else:
        await _stub(call).SignalProcess(
            api.SignalProcessRequest(sandbox=_sandbox(call), pid=pid, signal=int(request.signal)),
            metadata=call.metadata,
            timeout=RPC_SECONDS,
        )
    return e2b.SendSignalResponse()


async def close_stdin(request: e2b.CloseStdinRequest, rpc: ConnectRequest, call: SandboxCall):
    pid = await _pid(call, request.process)
    if terminals.find(call, pid):
        raise ConnectError("failed_precondition", "a PTY's stdin is not closed: send Ctrl+D (0x04) instead")
    await _stub(call).SendProcessInput(
        api.SendProcessInputRequest(sandbox=_sandbox(call), pid=pid, close_stdin=True),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    )
    return e2b.CloseStdinResponse()


async def update(request: e2b.UpdateRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.UpdateResponse:
    pid = await _pid(call, request.process)
    terminal = terminals.find(call, pid)
    if request.HasField("pty"):
        if terminal is None:
            raise ConnectError("invalid_argument", f"process {pid} has no PTY to resize")
        size = api.TerminalSize(cols=request.pty.size.cols, rows=request.pty.size.rows)
        terminal.send(api.ExecInteractiveRequest(resize=size))
    return e2b.UpdateResponse()
