"""RelayService: exec streams and file transfer between the gateway and guest agents."""

from __future__ import annotations

import asyncio

from google.protobuf import timestamp_pb2

from microvm.agent.v1 import agent_pb2
from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2
from services.common.agent_channel import AgentStream, AgentTarget, ChannelPool
from services.common.errors import InvalidArgument, error_from_code
from services.common.server import ServiceContext
from services.common.settings import RelaySettings

KEEPALIVE_SECONDS = 10.0
MAX_STDIN_CHUNK = 1 << 20
OUTPUT_FIELD = {agent_pb2.OUTPUT_CHANNEL_STDOUT: "stdout", agent_pb2.OUTPUT_CHANNEL_STDERR: "stderr"}
FILE_TYPE = {
    agent_pb2.FILE_KIND_FILE: sandbox_pb2.FILE_TYPE_FILE,
    agent_pb2.FILE_KIND_DIRECTORY: sandbox_pb2.FILE_TYPE_DIRECTORY,
    agent_pb2.FILE_KIND_SYMLINK: sandbox_pb2.FILE_TYPE_SYMLINK,
}


def to_target(target: relay_pb2.AgentTarget) -> AgentTarget:
    if not target.vm_id or not target.socket_path:
        raise InvalidArgument("target.vm_id and target.socket_path are required")
    return AgentTarget(
        vm_id=target.vm_id,
        socket_path=target.socket_path,
        transport=target.transport or "virtio-serial",
        vsock_port=target.vsock_port or 1024,
    )


def to_file_info(info: agent_pb2.FileInfo) -> sandbox_pb2.FileInfo:
    modified = timestamp_pb2.Timestamp()
    modified.FromNanoseconds(info.modify_time_ns)
    return sandbox_pb2.FileInfo(
        path=info.path,
        type=FILE_TYPE.get(info.kind, sandbox_pb2.FILE_TYPE_UNSPECIFIED),
        size=info.size,
        mode=info.mode,
        modify_time=modified,
        symlink_target=info.symlink_target,
        uid=info.uid,
        gid=info.gid,
    )


def exec_start(process: sandbox_service_pb2.ProcessConfig, has_stdin: bool) -> agent_pb2.ExecStart:
    if not process.argv:
        raise InvalidArgument("process.argv must name a program")
    if len(process.argv) > 4096:
        raise InvalidArgument("process.argv has more than 4096 entries")
    timeout_ms = process.timeout.seconds * 1000 + process.timeout.nanos // 1_000_000
    return agent_pb2.ExecStart(
        argv=process.argv,
        env=process.env,
        cwd=process.cwd,
        user=process.user,
        shell=process.shell,
        pty=process.pty,
        cols=process.terminal_size.cols,
        rows=process.terminal_size.rows,
        timeout_ms=max(timeout_ms, 0),
        stdin=has_stdin,
    )


def fail(frame: agent_pb2.Frame) -> Exception:
    return error_from_code(frame.error.code, frame.error.message)


async def exec_events(stream: AgentStream):
    """Agent frames of an exec stream as public ExecResponse events; grants credit as output is taken."""
    while True:
        try:
            frame = await stream.receive(timeout=KEEPALIVE_SECONDS)
        except TimeoutError:
            yield sandbox_service_pb2.ExecResponse(keepalive=sandbox_service_pb2.Keepalive())
            continue
        kind = frame.WhichOneof("body")
        if kind == "output":
            yield sandbox_service_pb2.ExecResponse(
                **{OUTPUT_FIELD.get(frame.output.channel, "stdout"): frame.output.data}
            )
            # Credit returns only once the event was handed to gRPC (which applies its own flow control).
            await stream.grant(len(frame.output.data))
        elif kind == "exec_started":
            yield sandbox_service_pb2.ExecResponse(
                started=sandbox_service_pb2.ProcessStarted(pid=frame.exec_started.pid)
            )
        elif kind == "exec_exited":
            exited = sandbox_service_pb2.ProcessExited(timed_out=frame.exec_exited.timed_out)
            if frame.exec_exited.signal:
                exited.signal = frame.exec_exited.signal
            else:
                exited.exit_code = frame.exec_exited.exit_code
            stream.closed = True
            yield sandbox_service_pb2.ExecResponse(exited=exited)
            return
        elif kind == "error":
            stream.closed = True
            raise fail(frame)


async def send_stdin(stream: AgentStream, data: bytes) -> None:
    for offset in range(0, len(data), MAX_STDIN_CHUNK):
        await stream.send(stdin=agent_pb2.StdinData(data=data[offset : offset + MAX_STDIN_CHUNK]))
    await stream.send(stdin=agent_pb2.StdinData(eof=True))


class RelayServicer(relay_pb2_grpc.RelayServiceServicer):
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.pool = ChannelPool(settings.connect_timeout_seconds)

    async def _stream(self, target: relay_pb2.AgentTarget) -> AgentStream:
        channel = await self.pool.get(to_target(target))
        return channel.open_stream()

    async def _single(self, target: relay_pb2.AgentTarget, **body) -> agent_pb2.FileResult:
        stream = await self._stream(target)
        try:
            await stream.send(**body)
            frame = await stream.receive()
            if frame.WhichOneof("body") == "error":
                raise fail(frame)
            return frame.file_result
        finally:
            await stream.close(cancel=False)

    async def Exec(self, request, context):
        stream = await self._stream(request.target)
        finished = False
        try:
            await stream.send(exec_start=exec_start(request.process, has_stdin=bool(request.stdin)))
            if request.stdin:
                await send_stdin(stream, request.stdin)
            async for event in exec_events(stream):
                finished = event.HasField("exited")
                yield relay_pb2.ExecResponse(event=event)
        finally:
            # A cancelled call or a passed deadline lands here too: the guest process is killed.
            await stream.close(cancel=not finished)

    async def ExecInteractive(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.request.WhichOneof("request") != "config":
            raise InvalidArgument("the first ExecInteractive message must carry the config")
        stream = await self._stream(first.target)
        finished = False

        async def forward_input():
            async for message in request_iterator:
                kind = message.request.WhichOneof("request")
                if kind == "stdin":
                    await stream.send(stdin=agent_pb2.StdinData(data=message.request.stdin))
                elif kind == "close_stdin":
                    await stream.send(stdin=agent_pb2.StdinData(eof=True))
                elif kind == "resize":
                    size = message.request.resize
                    await stream.send(resize=agent_pb2.ResizeTerminal(cols=size.cols, rows=size.rows))
                elif kind == "signal":
                    await stream.send(signal=agent_pb2.SignalProcess(signal=message.request.signal))

        forwarder = None
        try:
            await stream.send(exec_start=exec_start(first.request.config.process, has_stdin=True))
            forwarder = asyncio.create_task(forward_input())
            async for event in exec_events(stream):
                finished = event.HasField("exited")
                yield relay_pb2.ExecInteractiveResponse(event=event)
        finally:
            if forwarder:
                forwarder.cancel()
            await stream.close(cancel=not finished)

    async def WriteFile(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.request.WhichOneof("request") != "header":
            raise InvalidArgument("the first WriteFile message must carry the header")
        header = first.request.header
        stream = await self._stream(first.target)
        window = stream.channel.hello.initial_window if stream.channel.hello else 1 << 20
        credit = {"bytes": window}
        granted = asyncio.Event()

        async def watch_agent() -> agent_pb2.Frame:
            while True:
                frame = await stream.receive()
                if frame.WhichOneof("body") == "window_update":
                    credit["bytes"] += frame.window_update.increment
                    granted.set()
                elif frame.WhichOneof("body") in ("file_write_done", "error"):
                    return frame

        watcher = asyncio.create_task(watch_agent())
        finished = False
        try:
            await stream.send(
                file_write_start=agent_pb2.FileWriteStart(
                    path=header.path, mode=header.mode, make_parents=header.make_parents, append=header.append
                )
            )
            async for message in request_iterator:
                data = message.request.data
                # Send only within the agent's credit, so its buffer stays bounded by the window.
                while credit["bytes"] < min(len(data), window) and not watcher.done():
                    granted.clear()
                    await asyncio.wait(
                        [watcher, asyncio.ensure_future(granted.wait())], return_when=asyncio.FIRST_COMPLETED
                    )
                if watcher.done():
                    break  # the agent failed early (e.g. missing parent): report that
                credit["bytes"] -= len(data)
                await stream.send(file_data=agent_pb2.FileData(data=data))
            if not watcher.done():
                await stream.send(file_data=agent_pb2.FileData(eof=True))
            frame = await watcher
            finished = True
            if frame.WhichOneof("body") == "error":
                raise fail(frame)
            return relay_pb2.WriteFileResponse(
                response=sandbox_service_pb2.WriteFileResponse(
                    file=to_file_info(frame.file_write_done.file), sha256=frame.file_write_done.sha256
                )
            )
        finally:
            watcher.cancel()
            await stream.close(cancel=not finished)

    async def ReadFile(self, request, context):
        stream = await self._stream(request.target)
        finished = False
        try:
            read = request.request
            await stream.send(
                file_read_start=agent_pb2.FileReadStart(path=read.path, offset=read.offset, length=read.length)
            )
            while True:
                frame = await stream.receive()
                kind = frame.WhichOneof("body")
                if kind == "error":
                    finished = True
                    raise fail(frame)
                if kind == "file_data":
                    if frame.file_data.data:
                        yield relay_pb2.ReadFileResponse(data=frame.file_data.data)
                        await stream.grant(len(frame.file_data.data))
                    if frame.file_data.eof:
                        finished = True
                        return
        finally:
            await stream.close(cancel=not finished)

    async def ListDir(self, request, context):
        result = await self._single(request.target, list_dir=agent_pb2.ListDirRequest(path=request.path))
        return relay_pb2.ListDirResponse(entries=[to_file_info(e) for e in result.entries])

    async def Stat(self, request, context):
        result = await self._single(request.target, stat=agent_pb2.StatRequest(path=request.path))
        return relay_pb2.StatResponse(file=to_file_info(result.entries[0]))

    async def MakeDir(self, request, context):
        result = await self._single(
            request.target,
            make_dir=agent_pb2.MakeDirRequest(path=request.path, parents=request.parents, mode=request.mode),
        )
        return relay_pb2.MakeDirResponse(directory=to_file_info(result.entries[0]))

    async def Remove(self, request, context):
        await self._single(
            request.target, remove=agent_pb2.RemoveRequest(path=request.path, recursive=request.recursive)
        )
        return relay_pb2.RemoveResponse()

    async def PingAgent(self, request, context):
        channel = await self.pool.get(to_target(request.target))
        pong = await channel.ping(self.settings.connect_timeout_seconds)
        return relay_pb2.PingAgentResponse(
            uptime_seconds=pong.uptime_seconds,
            mem_total_kib=pong.mem_total_kib,
            mem_available_kib=pong.mem_available_kib,
            boot_id=pong.boot_id,
            hostname=pong.hostname,
        )

    async def SetGuestIdentity(self, request, context):
        import os

        channel = await self.pool.get(to_target(request.target))
        await channel.send(
            agent_pb2.Frame(
                stream_id=0, set_identity=agent_pb2.SetIdentity(hostname=request.hostname, entropy=os.urandom(64))
            )
        )
        await channel.ping(self.settings.connect_timeout_seconds)  # ordered after the identity change
        return relay_pb2.SetGuestIdentityResponse()

    async def CloseChannel(self, request, context):
        await self.pool.close(request.vm_id)
        return relay_pb2.CloseChannelResponse()


async def wire(server, context: ServiceContext[RelaySettings]) -> list[str]:
    servicer = RelayServicer(context.settings)
    relay_pb2_grpc.add_RelayServiceServicer_to_server(servicer, server)
    context.on_shutdown.append(servicer.pool.close_all)
    return [relay_pb2.DESCRIPTOR.services_by_name["RelayService"].full_name]
