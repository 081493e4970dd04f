"""GuestBackground: background processes on a guest's agent channel (StartProcess, ListProcesses, ConnectProcess,
SendProcessInput, SignalProcess). The processes live in the agent, not in a stream: a call here only starts,
lists, follows or signals them, and a follower that goes away leaves its process running."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.validation import check_process_input, check_process_ref, check_signal, check_tag
from services.relay.agent_channel import AgentStream
from services.relay.guest_io import exec_start, failure, sandbox_id
from services.relay.processes import exec_events


def to_process_info(info: agent_pb2.ProcessInfo) -> api.ProcessInfo:
    started = timestamp_pb2.Timestamp()
    started.FromNanoseconds(info.start_time_ns)
    public = api.ProcessInfo(
        pid=info.pid,
        argv=info.argv,
        tag=info.tag,
        cwd=info.cwd,
        running=info.running,
        start_time=started,
        output_bytes=info.output_bytes,
    )
    if not info.running:
        if info.exited.signal:
            public.exited.signal = info.exited.signal
        else:
            public.exited.exit_code = info.exited.exit_code
        public.exited.timed_out = info.exited.timed_out
    return public


class GuestBackground:
    def __init__(self, open_stream) -> None:
        # vm id -> a new stream on that guest's channel.
        self.open_stream = open_stream

    async def _ask(self, sandbox: str, answer: str, **body):
        stream: AgentStream = await self.open_stream(sandbox_id(sandbox))
        try:
            await stream.send(**body)
            frame = await stream.receive()
            if frame.WhichOneof("body") == "error":
                raise failure(frame)
            return getattr(frame, answer)
        finally:
            await stream.close(cancel=False)

    async def start(self, request: api.StartProcessRequest) -> api.StartProcessResponse:
        check_tag(request.tag)
        start = agent_pb2.ProcessStart(exec=exec_start(request.process, has_stdin=request.stdin), tag=request.tag)
        start.exec.pty = False  # no terminal to attach to: a follower gets plain output
        info = await self._ask(request.sandbox, "process_info", process_start=start)
        return api.StartProcessResponse(process=to_process_info(info))

    async def list(self, request: api.ListProcessesRequest) -> api.ListProcessesResponse:
        listing = await self._ask(request.sandbox, "process_listing", process_list=agent_pb2.ProcessListRequest())
        return api.ListProcessesResponse(processes=[to_process_info(p) for p in listing.processes])

    async def send_input(self, request: api.SendProcessInputRequest) -> api.SendProcessInputResponse:
        check_process_ref(request.pid)
        check_process_input(request.stdin)
        control = agent_pb2.ProcessControl(pid=request.pid, stdin=request.stdin, close_stdin=request.close_stdin)
        info = await self._ask(request.sandbox, "process_info", process_control=control)
        return api.SendProcessInputResponse(process=to_process_info(info))

    async def signal(self, request: api.SignalProcessRequest) -> api.SignalProcessResponse:
        check_process_ref(request.pid)
        check_signal(request.signal)
        control = agent_pb2.ProcessControl(pid=request.pid, signal=request.signal)
        info = await self._ask(request.sandbox, "process_info", process_control=control)
        return api.SignalProcessResponse(process=to_process_info(info))

    async def connect(self, request: api.ConnectProcessRequest):
        check_process_ref(request.pid, tail_bytes=request.tail_bytes)
        stream: AgentStream = await self.open_stream(sandbox_id(request.sandbox))
        finished = False
        try:
            await stream.send(process_attach=agent_pb2.ProcessAttach(pid=request.pid, tail_bytes=request.tail_bytes))
            async for event in exec_events(stream):
                finished = event.HasField("exited")
                yield api.ConnectProcessResponse(event=event)
        finally:
            # Cancelling a follower only stops following: the process is not this stream's.
            await stream.close(cancel=not finished)
