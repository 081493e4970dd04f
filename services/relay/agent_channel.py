"""AgentChannel: the relay's end of one guest agent's byte channel, multiplexing many streams.

Transports: a QEMU virtio-serial port exposed as a unix socket, or Cloud Hypervisor's hybrid vsock (connect
to the unix socket, write `CONNECT <port>\\n`, read `OK <port>\\n`). Whatever the guest sends is untrusted:
a malformed frame is logged and dropped, an impossible length closes the channel, and the relay lives on.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import structlog

from microvm.agent.v1 import agent_pb2
from microvm_agent.framing import MAX_FRAME_BYTES, FrameDecoder, FrameTooLarge, encode
from services.common.errors import ServiceError, Unavailable
from services.common.tasks import cancel_and_wait

log = structlog.get_logger()

VIRTIO_SERIAL = "virtio-serial"
HYBRID_VSOCK = "hybrid-vsock"


@dataclass
class AgentTarget:
    vm_id: str
    socket_path: str
    transport: str = VIRTIO_SERIAL
    vsock_port: int = 1024

    @property
    def endpoint(self) -> tuple[str, int]:
        """What identifies the guest's one channel: a pooled VM handed out under a new id keeps it."""
        return self.socket_path, self.vsock_port


class ChannelClosed(Exception):
    pass


@dataclass
class AgentStream:
    """One stream on a channel: frames from the agent arrive in `frames`."""

    channel: AgentChannel
    stream_id: int
    frames: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False

    async def send(self, **body) -> None:
        await self.channel.send(agent_pb2.Frame(stream_id=self.stream_id, **body))

    async def receive(self, timeout: float | None = None) -> agent_pb2.Frame:
        """Next frame; raises Unavailable when the channel died, TimeoutError after `timeout`."""
        item = await asyncio.wait_for(self.frames.get(), timeout) if timeout else await self.frames.get()
        if isinstance(item, ChannelClosed):
            raise Unavailable(f"agent of VM {self.channel.target.vm_id} went away: {item}", reason="AGENT_UNAVAILABLE")
        if isinstance(item, ServiceError):  # the caller's side of the stream failed (see `abort`)
            raise item
        return item

    def abort(self, error: ServiceError) -> None:
        """Ends the stream with `error` for whoever is receiving (a bad message from the caller mid-stream)."""
        self.frames.put_nowait(error)

    async def grant(self, increment: int) -> None:
        if increment > 0 and not self.closed:
            await self.send(window_update=agent_pb2.WindowUpdate(increment=increment))

    async def close(self, cancel: bool) -> None:
        """Forgets the stream; with `cancel` the agent kills its process or aborts its transfer."""
        if self.closed:
            return
        self.closed = True
        self.channel.streams.pop(self.stream_id, None)
        if cancel and not self.channel.is_closed:
            try:
                await self.send(cancel=agent_pb2.Cancel())
            except Exception:
                pass


class AgentChannel:
    def __init__(self, target: AgentTarget) -> None:
        self.target = target
        self.streams: dict[int, AgentStream] = {}
        # Stream ids start at a random base per connection so frames left over from an earlier
        # connection (or from before a snapshot) never match a live stream.
        self._next_id = random.randrange(1 << 32, 1 << 62)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        self._pongs: dict[int, asyncio.Future] = {}
        self.hello: agent_pb2.Hello | None = None
        self.is_closed = False
        self.malformed_frames = 0

    async def connect(self, timeout: float) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.target.socket_path, limit=MAX_FRAME_BYTES * 2), timeout
            )
        except (TimeoutError, OSError) as exc:
            raise Unavailable(
                f"cannot reach the agent channel of VM {self.target.vm_id}: {exc}", reason="AGENT_UNAVAILABLE"
            ) from None
        if self.target.transport == HYBRID_VSOCK:
            writer.write(f"CONNECT {self.target.vsock_port}\n".encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), timeout)
            if not answer.startswith(b"OK"):
                writer.close()
                raise Unavailable(
                    f"vsock CONNECT refused for VM {self.target.vm_id}: {answer!r}", reason="AGENT_UNAVAILABLE"
                )
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"agent-read-{self.target.vm_id}")

    async def ping(self, timeout: float) -> agent_pb2.Pong:
        nonce = random.getrandbits(63)
        future = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = future
        try:
            await self.send(agent_pb2.Frame(stream_id=0, ping=agent_pb2.Ping(nonce=nonce)))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pongs.pop(nonce, None)

    async def wait_until_answering(self, timeout: float, interval: float = 1.0) -> agent_pb2.Pong:
        """Pings until a pong comes back: a ping that crossed a reconnect in the guest may be lost."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError()
            try:
                return await self.ping(min(interval, remaining))
            except TimeoutError:
                continue

    async def run_to_exit(self, argv: list[str], timeout: float) -> agent_pb2.Frame:
        """Runs `argv` in the guest and returns its last frame (exec_exited or error); output is dropped."""
        stream = self.open_stream()
        try:
            await stream.send(exec_start=agent_pb2.ExecStart(argv=argv))
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                frame = await stream.receive(timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
                if frame.WhichOneof("body") in ("exec_exited", "error"):
                    return frame
        finally:
            await stream.close(cancel=False)

    def open_stream(self) -> AgentStream:
        if self.is_closed:
            raise Unavailable(f"agent channel of VM {self.target.vm_id} is closed", reason="AGENT_UNAVAILABLE")
        self._next_id += 1
        stream = AgentStream(self, self._next_id)
        self.streams[stream.stream_id] = stream
        return stream

    async def send(self, frame: agent_pb2.Frame) -> None:
        if self.is_closed or self._writer is None:
            raise Unavailable(f"agent channel of VM {self.target.vm_id} is closed", reason="AGENT_UNAVAILABLE")
        data = encode(frame)
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(f"write failed: {exc}")
                raise Unavailable(
                    f"agent channel of VM {self.target.vm_id} broke: {exc}", reason="AGENT_UNAVAILABLE"
                ) from None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        reason = "the VM closed the channel"
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                for body in decoder.feed(data):
                    self._route(body)
        except FrameTooLarge as exc:
            reason = f"protocol violation: {exc}"
            log.warning("agent_channel_protocol_violation", vm=self.target.vm_id, error=str(exc))
        except asyncio.CancelledError:
            reason = "channel closed by the relay"
        except Exception as exc:
            reason = f"read failed: {exc}"
        self._fail(reason)

    def _route(self, body: bytes) -> None:
        try:
            frame = agent_pb2.Frame.FromString(body)
        except Exception:
            self.malformed_frames += 1
            if self.malformed_frames <= 3 or self.malformed_frames % 1000 == 0:
                log.warning("agent_sent_malformed_frame", vm=self.target.vm_id, count=self.malformed_frames)
            return
        kind = frame.WhichOneof("body")
        if frame.stream_id == 0:
            if kind == "pong":
                future = self._pongs.get(frame.pong.nonce)
                if future and not future.done():
                    future.set_result(frame.pong)
            elif kind == "hello":
                self.hello = frame.hello
            elif kind == "error":
                log.warning("agent_channel_error", vm=self.target.vm_id, message=frame.error.message)
            return
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            stream.frames.put_nowait(frame)
        elif kind not in ("error", "exec_exited", "file_write_done", "file_result") and frame.stream_id > 0:
            # Output of a stream nobody listens to any more (stale after reconnect/restore): stop it.
            asyncio.get_running_loop().create_task(self._cancel_stale(frame.stream_id))

    async def _cancel_stale(self, stream_id: int) -> None:
        try:
            await self.send(agent_pb2.Frame(stream_id=stream_id, cancel=agent_pb2.Cancel()))
        except Exception:
            pass

    def _fail(self, reason: str) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for stream in list(self.streams.values()):
            stream.frames.put_nowait(ChannelClosed(reason))
        for future in self._pongs.values():
            if not future.done():
                future.set_exception(
                    Unavailable(f"agent of VM {self.target.vm_id}: {reason}", reason="AGENT_UNAVAILABLE")
                )
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        await cancel_and_wait(self._reader_task)
        self._fail("channel closed by the relay")


class ChannelPool:
    """One live channel per guest endpoint, (re)connected on demand: the relay is the only client of a
    guest's agent (virtio-serial serves one connection at a time)."""

    def __init__(self, connect_timeout: float) -> None:
        self._channels: dict[tuple[str, int], AgentChannel] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._connect_timeout = connect_timeout

    def live(self, target: AgentTarget) -> AgentChannel | None:
        channel = self._channels.get(target.endpoint)
        return channel if channel and not channel.is_closed else None

    async def get(self, target: AgentTarget, timeout: float | None = None) -> AgentChannel:
        """The guest's channel, answering; a new connection is tried until `timeout` (default: the connect
        timeout), which covers a guest still booting (its hybrid-vsock listener is not up yet)."""
        if channel := self.live(target):
            return channel
        lock = self._locks.setdefault(target.endpoint, asyncio.Lock())
        async with lock:
            if channel := self.live(target):
                return channel
            deadline = asyncio.get_running_loop().time() + (timeout or self._connect_timeout)
            while True:
                channel = AgentChannel(target)
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    await channel.connect(max(0.1, min(remaining, self._connect_timeout)))
                    await channel.wait_until_answering(max(0.1, remaining))
                    break
                except (TimeoutError, Unavailable) as exc:
                    await channel.close()
                    if asyncio.get_running_loop().time() + 0.05 >= deadline:
                        raise Unavailable(
                            f"agent of VM {target.vm_id} does not answer: {exc or 'timeout'}",
                            reason="AGENT_UNAVAILABLE",
                        ) from None
                    await asyncio.sleep(0.05)
            self._channels[target.endpoint] = channel
            return channel

    async def close(self, target: AgentTarget) -> None:
        channel = self._channels.pop(target.endpoint, None)
        self._locks.pop(target.endpoint, None)
        if channel:
            await channel.close()

    async def close_all(self) -> None:
        for channel in list(self._channels.values()):
            await channel.close()
        self._channels.clear()
