"""GuestProcesses: Exec and ExecInteractive on a guest's agent channel, as public ExecResponse events.

Flow control end to end: the agent sends output within the credit the relay grants, and credit returns only
once gRPC took the event, so a slow caller slows the guest process instead of filling memory. A cancelled
call or a passed deadline kills the guest process.
"""

from __future__ import annotations

import asyncio
import time

from opentelemetry import propagate, trace

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.client_streams import DRAIN_SECONDS, drain
from services.common.errors import InvalidArgument, ServiceError
from services.common.validation import check_terminal
from services.relay.agent_channel import AgentStream
from services.relay.guest_io import exec_start, failure, sandbox_id

TRACER = trace.get_tracer("microvm.relay")
KEEPALIVE_SECONDS = 10.0
MAX_STDIN_CHUNK = 1 << 20
MAX_EXEC_STDIN = 4 << 20
OUTPUT_FIELD = {agent_pb2.OUTPUT_CHANNEL_STDOUT: "stdout", agent_pb2.OUTPUT_CHANNEL_STDERR: "stderr"}


def traceparent() -> str:
    """The current call's W3C trace context, for the agent frame that opens a stream ("" outside a trace)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def record_guest_spawn(started: agent_pb2.ExecStarted, start_sent_ns: int = 0) -> None:
    """The guest's part of an exec up to its process's start, as spans of the current trace: the ExecStart frame's
    way to the agent (from when the relay sent it), the agent taking it to the process spawned, and the ExecStarted
    frame's way back. Guest times are the guest's wall clock, which the relay keeps set from the host's, so a
    one-way figure is as good as that sync (about a millisecond)."""
    if not (started.received_unix_ns and started.spawned_unix_ns):
        return  # an agent from before these fields
    spawned = max(started.spawned_unix_ns, started.received_unix_ns)
    if start_sent_ns:
        span_between("agent_channel.to_guest", start_sent_ns, started.received_unix_ns)
    span_between("guest.exec.spawn", started.received_unix_ns, spawned, pid=started.pid)
    span_between("agent_channel.to_host", spawned, time.time_ns(), frame="exec_started")


def record_guest_exit(exited: agent_pb2.ExecExited, spawned_ns: int) -> None:
    """The rest of the guest's part: the process running until the agent reaped it, the agent draining its output
    and sending ExecExited, and that frame's way back to the relay."""
    if not (exited.reaped_unix_ns and exited.sent_unix_ns):
        return  # an agent from before these fields
    if spawned_ns:
        span_between("guest.exec.run", spawned_ns, exited.reaped_unix_ns)
    span_between("guest.exec.finish", exited.reaped_unix_ns, exited.sent_unix_ns)
    span_between("agent_channel.to_host", exited.sent_unix_ns, time.time_ns(), frame="exec_exited")


def span_between(name: str, start_ns: int, end_ns: int, **attributes) -> None:
    span = TRACER.start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(start_ns, end_ns))


async def exec_events(stream: AgentStream, max_output_bytes: int = 0, start_sent_ns: int = 0):
    """Agent frames of an exec stream as public ExecResponse events; grants credit as output is taken. Output
    beyond `max_output_bytes` (0: no limit) is dropped, its credit granted at once. `start_sent_ns`: when the
    ExecStart frame was sent, for the trace's spans of the guest's part."""
    produced = spawned_ns = 0
    while True:
        try:
            frame = await stream.receive(timeout=KEEPALIVE_SECONDS)
        except TimeoutError:
            yield api.ExecResponse(keepalive=api.Keepalive())
            continue
        kind = frame.WhichOneof("body")
        if kind == "output":
            data = frame.output.data
            room = max_output_bytes - produced if max_output_bytes else len(data)
            produced += len(data)
            # Credit returns as the chunk is taken, before it is handed to gRPC: the guest reads its next chunk
            # while this one crosses to the caller. Still bounded: the next grant waits for this yield, which
            # waits for gRPC's own flow control, so a slow caller holds at most two windows here.
            await stream.grant(len(data))
            if room > 0:
                yield api.ExecResponse(**{OUTPUT_FIELD.get(frame.output.channel, "stdout"): data[:room]})
        elif kind == "exec_started":
            record_guest_spawn(frame.exec_started, start_sent_ns)
            spawned_ns = frame.exec_started.spawned_unix_ns
            yield api.ExecResponse(started=api.ProcessStarted(pid=frame.exec_started.pid))
        elif kind == "exec_exited":
            record_guest_exit(frame.exec_exited, spawned_ns)
            exited = api.ProcessExited(
                timed_out=frame.exec_exited.timed_out,
                output_bytes=produced,
                output_truncated=bool(max_output_bytes) and produced > max_output_bytes,
            )
            if frame.exec_exited.signal:
                exited.signal = frame.exec_exited.signal
            else:
                exited.exit_code = frame.exec_exited.exit_code
            stream.closed = True
            yield api.ExecResponse(exited=exited)
            return
        elif kind == "error":
            stream.closed = True
            raise failure(frame)


async def send_stdin(stream: AgentStream, data: bytes) -> None:
    for offset in range(0, len(data), MAX_STDIN_CHUNK):
        await stream.send(stdin=agent_pb2.StdinData(data=data[offset : offset + MAX_STDIN_CHUNK]))
    await stream.send(stdin=agent_pb2.StdinData(eof=True))


class GuestProcesses:
    def __init__(self, open_stream) -> None:
        # vm id -> a new stream on that guest's channel.
        self.open_stream = open_stream

    async def exec(self, request: api.ExecRequest):
        if len(request.stdin) > MAX_EXEC_STDIN:
            raise InvalidArgument(f"stdin is limited to {MAX_EXEC_STDIN} bytes in Exec; use ExecInteractive")
        start = exec_start(request.process, has_stdin=bool(request.stdin))
        stream = await self.open_stream(sandbox_id(request.sandbox))
        finished = False
        try:
            start_sent_ns = time.time_ns()
            await stream.send(exec_start=start, traceparent=traceparent())
            if request.stdin:
                await send_stdin(stream, request.stdin)
            async for event in exec_events(stream, request.max_output_bytes, start_sent_ns):
                finished = event.HasField("exited")
                yield event
        finally:
            # A cancelled call or a passed deadline lands here too: the guest process is killed.
            await stream.close(cancel=not finished)

    async def exec_interactive(self, requests):
        try:
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("request") != "config":
                raise InvalidArgument("the first ExecInteractive message must carry the config")
            start = exec_start(first.config.process, has_stdin=True)
            stream = await self.open_stream(sandbox_id(first.config.sandbox))
        except Exception:
            await drain(requests)  # the caller learns why, not INTERNAL (see `drain`)
            raise
        finished = False
        # Once the process ended (or failed), what the caller still sends is read and dropped (see `drain`).
        ended = asyncio.Event()

        async def forward_input():
            try:
                await forward(stream, requests)
            except ServiceError as error:  # a bad message, or the agent went away: the call ends with it
                stream.abort(error)
                await drain(requests)

        async def forward(stream, requests):
            async for message in requests:
                if ended.is_set():
                    continue
                kind = message.WhichOneof("request")
                if kind == "stdin":
                    await stream.send(stdin=agent_pb2.StdinData(data=message.stdin))
                elif kind == "close_stdin":
                    await stream.send(stdin=agent_pb2.StdinData(eof=True))
                elif kind == "resize":
                    size = message.resize
                    check_terminal(size.cols, size.rows)
                    await stream.send(resize=agent_pb2.ResizeTerminal(cols=size.cols, rows=size.rows))
                elif kind == "signal":
                    await stream.send(signal=agent_pb2.SignalProcess(signal=message.signal))

        forwarder = None
        over = False  # ended by the process or a failure, not by the caller going away
        try:
            await stream.send(exec_start=start, traceparent=traceparent())
            forwarder = asyncio.create_task(forward_input())
            async for event in exec_events(stream):
                finished = event.HasField("exited")
                yield api.ExecInteractiveResponse(event=event)
            over = True
        except Exception:
            over = True
            raise
        finally:
            ended.set()
            if forwarder:
                if over:
                    await asyncio.wait([forwarder], timeout=DRAIN_SECONDS)
                forwarder.cancel()
            await stream.close(cancel=not finished)
