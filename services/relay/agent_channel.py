"""AgentChannel: the relay's end of one guest agent's byte channel, multiplexing many streams.

Transports: a QEMU virtio-serial port exposed as a unix socket, or Cloud Hypervisor's hybrid vsock (connect
to the unix socket, write `CONNECT <port>\\n`, read `OK <port>\\n`). Whatever the guest sends is untrusted:
its cost is bounded (channel_guard.py), and a guest that breaks the protocol loses its channel (`violation`
says why) while the relay and every other channel go on.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from microvm.agent.v1 import agent_pb2
from microvm_agent.framing import MAX_FRAME_BYTES, FrameDecoder, FrameTooLarge, encode
from services.common.errors import Aborted, ServiceError, Unavailable
from services.common.tasks import cancel_and_wait
from services.relay.channel_guard import ChannelLimits, JunkMeter, ProtocolViolation, data_size
from services.relay.frame_sync import FrameSeeker

log = structlog.get_logger()

VIRTIO_SERIAL = "virtio-serial"
HYBRID_VSOCK = "hybrid-vsock"


@dataclass
class AgentTarget:
    vm_id: str
    socket_path: str
    transport: str = VIRTIO_SERIAL
    vsock_port: int = 1024
    # The VMM process behind the endpoint (its pid): a VM started again is a new guest, with a clean slate.
    generation: int = 0

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
    # Payload bytes queued for the caller and not taken yet.
    buffered: int = 0

    async def send(self, **body) -> None:
        await self.channel.send(agent_pb2.Frame(stream_id=self.stream_id, **body))

    async def receive(self, timeout: float | None = None) -> agent_pb2.Frame:
        """Next frame; raises Unavailable when the channel died, TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout or None):
            item = await self.frames.get()
        if isinstance(item, ChannelClosed):
            raise Unavailable(f"agent of VM {self.channel.target.vm_id} went away: {item}", reason="AGENT_UNAVAILABLE")
        if isinstance(item, ServiceError):  # the caller's side failed (`abort`), or the agent restarted
            raise item
        size = data_size(item)
        self.buffered -= size
        self.channel.buffered -= size
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
    def __init__(
        self, target: AgentTarget, limits: ChannelLimits | None = None, on_closed=None, paused=lambda: False
    ) -> None:
        self.target = target
        # Whether the guest is paused now (its VM record says so): a paused guest answers nothing, and that is no
        # reason to close its channel (a pooled VM would otherwise be reconnected, slowly, when it is handed out).
        self.paused = paused
        # Awaited with this channel once its reader ended (the pool quarantines a guest that broke the protocol).
        self._on_closed = on_closed
        self.limits = limits or ChannelLimits()
        self.junk = JunkMeter(self.limits)
        # Why the channel was closed for breaking the protocol; None while the guest behaves.
        self.violation: str | None = None
        # The VM's end of the channel closed (its VMM exited or closed the socket): the VM went away, which compute
        # reports (its process watch, its reconciliation); nothing the guest said broke the protocol.
        self.closed_by_vm = False
        self._closing: asyncio.Future | None = None
        self.buffered = 0
        self._stale: dict[int, None] = {}  # stream ids to cancel (ordered, bounded)
        self._stale_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_frame = time.monotonic()
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
        self._tasks = [
            asyncio.create_task(self._cancel_stale_streams(), name=f"agent-stale-{self.target.vm_id}"),
            asyncio.create_task(self._heartbeat(), name=f"agent-heartbeat-{self.target.vm_id}"),
        ]

    async def ping(self, timeout: float) -> agent_pb2.Pong:
        nonce = random.getrandbits(63)
        future = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = future
        try:
            await self.send(agent_pb2.Frame(stream_id=0, ping=agent_pb2.Ping(nonce=nonce)))
            async with asyncio.timeout(timeout):
                return await future
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
        decoder, seeker = FrameDecoder(), FrameSeeker()
        reason = "the VM closed the channel"
        try:
            while True:
                # A frame the guest began must be finished soon: a half-written one would wedge the channel.
                started = decoder.pending
                try:
                    async with asyncio.timeout(self.limits.frame_seconds if started else None):
                        data = await reader.read(1 << 20)
                except TimeoutError:
                    raise ProtocolViolation(
                        f"a frame stayed half-written for {self.limits.frame_seconds:.0f} s"
                    ) from None
                if not data:
                    self.closed_by_vm = True
                    break
                self._last_frame = time.monotonic()
                if seeker is not None:  # no whole frame of this connection yet: what precedes one is stale
                    try:
                        found = seeker.feed(data)
                    except ValueError as exc:
                        raise ProtocolViolation(str(exc)) from None
                    if found is None:
                        continue
                    if seeker.dropped:
                        log.warning("agent_channel_stale_bytes_dropped", vm=self.target.vm_id, bytes=seeker.dropped)
                    data, seeker = found, None
                try:
                    bodies = decoder.feed(data)
                except FrameTooLarge as exc:
                    raise ProtocolViolation(str(exc)) from None
                for body in bodies:
                    self._route(body)
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc}"
            self.violation = str(exc)
            log.warning("agent_channel_protocol_violation", vm=self.target.vm_id, error=str(exc))
        except asyncio.CancelledError:
            reason = "channel closed by the relay"
        except Exception as exc:
            reason = f"read failed: {exc}"
        self._fail(reason)
        if self._on_closed is not None:
            # Shielded: whoever closes this channel because it failed must not cancel the record of why.
            self._closing = asyncio.ensure_future(self._on_closed(self))
            self._closing.add_done_callback(self._closing_done)
            await asyncio.shield(self._closing)

    def _closing_done(self, hook: asyncio.Future) -> None:
        if not hook.cancelled() and hook.exception() is not None:
            log.error("agent_channel_close_hook_failed", vm=self.target.vm_id, error=repr(hook.exception()))

    def _route(self, body: bytes) -> None:
        try:
            frame = agent_pb2.Frame.FromString(body)
        except Exception:
            self.junk.count("a malformed frame")
            return
        kind = frame.WhichOneof("body")
        if frame.stream_id == 0:
            if kind == "pong":
                future = self._pongs.get(frame.pong.nonce)
                if future and not future.done():
                    future.set_result(frame.pong)
                else:
                    self.junk.count("an unasked-for pong")
            elif kind == "hello":
                if self.hello is not None:
                    self._agent_restarted()
                self.hello = frame.hello
            elif kind == "error":
                self.junk.count("an error on the control stream")
                log.warning("agent_channel_error", vm=self.target.vm_id, message=frame.error.message[:200])
            else:
                self.junk.count(f"{kind} on the control stream")
            return
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            self.junk.count(f"{kind} for stream {frame.stream_id}, which is not open")
            if (
                kind not in ("error", "exec_exited", "file_write_done", "file_result")
                and len(self._stale) < self.limits.stale_cancels
            ):
                # Output of a stream nobody listens to any more (stale after reconnect/restore): stop it.
                self._stale[frame.stream_id] = None
                self._stale_wake.set()
            return
        size = data_size(frame)
        stream.buffered += size
        self.buffered += size
        if stream.buffered > self.limits.stream_buffer_bytes or self.buffered > self.limits.channel_buffer_bytes:
            raise ProtocolViolation(
                f"sent {stream.buffered} bytes to stream {stream.stream_id} beyond the credit it was granted"
            )
        stream.frames.put_nowait(frame)

    def _agent_restarted(self) -> None:
        """A second Hello: the agent started again and lost every stream of the old one. Their callers are told
        so: ABORTED, never an exit status the process did not report."""
        log.warning("agent_restarted", vm=self.target.vm_id, streams=len(self.streams))
        for stream in list(self.streams.values()):
            stream.frames.put_nowait(
                Aborted(
                    f"the agent of VM {self.target.vm_id} restarted; the process and its output are lost",
                    reason="AGENT_RESTARTED",
                )
            )
        self.streams.clear()

    async def _cancel_stale_streams(self) -> None:
        """One task per channel sends the cancels for stale streams, each id once."""
        cancelled: deque[int] = deque(maxlen=4 * self.limits.stale_cancels)
        while True:
            await self._stale_wake.wait()
            self._stale_wake.clear()
            while self._stale:
                stream_id = next(iter(self._stale))
                del self._stale[stream_id]
                if stream_id in cancelled:
                    continue
                cancelled.append(stream_id)
                try:
                    await self.send(agent_pb2.Frame(stream_id=stream_id, cancel=agent_pb2.Cancel()))
                except Unavailable:
                    return

    async def _heartbeat(self) -> None:
        """A channel the guest has been quiet on is pinged; one that does not answer is closed."""
        while not self.is_closed:
            await asyncio.sleep(self.limits.heartbeat_seconds / 2)
            if time.monotonic() - self._last_frame < self.limits.heartbeat_seconds or self.paused():
                continue
            try:
                await self.ping(self.limits.heartbeat_timeout_seconds)
            except TimeoutError:
                if self.paused():
                    continue  # paused while the ping was out: its answer comes when it runs again
                self._fail(
                    f"the agent stopped answering: no reply to a ping in {self.limits.heartbeat_timeout_seconds:.0f} s"
                )
            except Unavailable:
                return

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
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        await cancel_and_wait(self._reader_task)
        for task in self._tasks:
            await cancel_and_wait(task)
        self._fail("channel closed by the relay")
