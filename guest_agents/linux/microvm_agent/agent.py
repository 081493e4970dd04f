"""The agent's protocol engine: one multiplexed channel, many concurrent exec and file streams.

Transport-agnostic: `Agent.serve(transport)` runs over anything that reads and writes bytes (the
virtio-serial port in a guest, a unix socket in tests). Output travels only within the credit the host
grants per stream (WindowUpdate), so a slow client applies back-pressure all the way to the process's
pipe instead of making either side buffer without bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid

from microvm.agent.v1 import agent_pb2
from microvm_agent import archives, background, connections, system, watch
from microvm_agent.files import FILE_OPERATIONS, FileTransfer
from microvm_agent.framing import MAX_FRAME_BYTES, FrameDecoder, FrameTooLarge, encode_parts
from microvm_agent.processes import Process
from microvm_agent.streams import (
    FAILED_PRECONDITION,
    INITIAL_WINDOW,
    INTERNAL,
    INVALID_ARGUMENT,
    PROTOCOL_VERSION,
    StreamError,
)

# Streams of file transfers beyond read and write: kind of start frame -> the class that serves it.
FILE_STREAMS = {**archives.FILE_STREAMS, **watch.FILE_STREAMS, **background.STREAMS, **connections.FILE_STREAMS}


class Agent:
    def __init__(self, initial_window: int = INITIAL_WINDOW, is_init: bool = False, simulated: bool = False) -> None:
        self.initial_window = initial_window
        self.is_init = is_init
        # On a host standing in for a guest: identity and network changes are recorded, never applied.
        self.simulated = simulated
        self.simulated_hostname = "simulated-guest"
        self.given_hostname = ""  # an agent that is neither PID 1 nor simulated: the name it was given, not applied
        # Not the guest's init (simulated, or an agent run on a host in tests): the clock the host set is kept as
        # an offset from this machine's own, which is never changed.
        self.simulated_clock_offset_ns = 0
        # Simulated in a UTS namespace of its own (`unshare --uts`): it may set the host name it lives in.
        self.own_uts = False
        self.boot_id = uuid.uuid4().hex
        self.streams: dict[int, Process | FileTransfer] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.children: dict[int, Process] = {}
        # Frames waiting for the writer, and the future it waits on while there are none: a list and a future, not
        # an asyncio.Queue, since every frame passes here and each Queue operation is several calls under emulation.
        self._outgoing: list[bytes] = []
        self._writer_idle: asyncio.Future | None = None
        self._transport = None  # the connected host's, while serve() runs

    # --- sending ---------------------------------------------------------------------------------
    def send(self, stream_id: int, **body) -> None:
        parts = encode_parts(agent_pb2.Frame(stream_id=stream_id, **body))
        idle = self._writer_idle is not None and not self._writer_idle.done()
        if idle and self._transport is not None:
            # Nothing queued or being written: the frame goes out now, not a loop turn later from the writer (a turn
            # costs about 0.1 ms under emulation, and an exec sends two frames). What the channel does not take now
            # is the writer's, in order.
            parts = self._transport.write_now(parts)
            if not parts:
                return
        self._outgoing += parts
        if idle:
            self._writer_idle.set_result(None)

    def send_error(self, stream_id: int, code: int, message: str, reason: str = "") -> None:
        self.send(stream_id, error=agent_pb2.Error(code=code, message=message[:4096], reason=reason))

    # --- child processes (the agent may be PID 1: it reaps everything) ----------------------------
    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.child_exited(pid, status)

    def child_exited(self, pid: int, status: int) -> None:
        """A child was reaped (by the reaper, or by its own process's pidfd watch)."""
        process = self.children.pop(pid, None)
        if process is not None:
            process.child.reaped(status)  # tell subprocess, if it started it, not to wait for it again
            process.reaped_unix_ns = time.time_ns()
            if not process.exit_status.done():
                process.exit_status.set_result(status)

    # --- receiving -------------------------------------------------------------------------------
    def dispatch(self, body: bytes) -> None:
        try:
            frame = agent_pb2.Frame.FromString(body)
        except Exception as exc:
            self.send_error(0, INVALID_ARGUMENT, f"malformed frame: {exc}")
            return
        kind = frame.WhichOneof("body")
        stream_id = frame.stream_id
        if kind == "ping":
            total, available = system.meminfo_kib()
            self.send(
                0,
                pong=agent_pb2.Pong(
                    nonce=frame.ping.nonce,
                    uptime_seconds=system.uptime_seconds(),
                    mem_total_kib=total,
                    mem_available_kib=available,
                    boot_id=self.boot_id,
                    hostname=self.hostname,
                    unix_time_ns=time.time_ns() + self.simulated_clock_offset_ns,
                ),
            )
        elif kind == "set_identity":
            self._set_identity(frame.set_identity)
        elif kind == "set_clock":
            self._set_clock(frame.set_clock.unix_time_ns)
        elif kind == "shutdown":
            if self.is_init:
                system.power_off()
        elif (
            kind in ("exec_start", "file_write_start", "file_read_start", "configure_network")
            or kind in FILE_OPERATIONS
            or kind in FILE_STREAMS
        ):
            if stream_id == 0 or stream_id in self.streams or stream_id in self.tasks:
                self.send_error(stream_id, INVALID_ARGUMENT, f"stream {stream_id} is already in use")
                return
            # Registered before the task runs: stdin or data frames right behind the start must find it.
            if kind == "exec_start":
                process = self.streams[stream_id] = Process(self, stream_id, frame.exec_start, frame.traceparent)
                process.launch()
            elif kind in ("file_write_start", "file_read_start"):
                self.streams[stream_id] = FileTransfer(self, stream_id)
            elif kind in FILE_STREAMS:
                self.streams[stream_id] = FILE_STREAMS[kind](self, stream_id)
            self.tasks[stream_id] = asyncio.create_task(self._run_stream(stream_id, kind, frame))
        elif kind == "cancel":
            self.cancel_stream(stream_id)
        elif kind is None:
            self.send_error(stream_id, INVALID_ARGUMENT, "frame has no body")
        else:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.handle(frame)
            # Frames for unknown streams are stale (sent before a restore or reconnect): ignore them.

    async def _run_stream(self, stream_id: int, kind: str, frame: agent_pb2.Frame) -> None:
        try:
            if kind == "exec_start":
                await self.streams[stream_id].run()
            elif kind == "file_write_start":
                await self.streams[stream_id].write(frame.file_write_start)
            elif kind == "file_read_start":
                await self.streams[stream_id].read(frame.file_read_start)
            elif kind in FILE_STREAMS:
                await self.streams[stream_id].run(getattr(frame, kind))
            elif kind == "configure_network":
                request = frame.configure_network
                try:
                    interface = (
                        "simulated0"
                        if self.simulated
                        else await system.configure_network(
                            request.mac_address, request.address_cidr, request.gateway, list(request.dns_servers)
                        )
                    )
                except OSError as exc:
                    raise StreamError(FAILED_PRECONDITION, f"configure network: {exc.strerror or exc}") from None
                self.send(stream_id, network_configured=agent_pb2.NetworkConfigured(interface=interface))
            else:
                result = FILE_OPERATIONS[kind](getattr(frame, kind))
                self.send(stream_id, file_result=result)
        except StreamError as exc:
            self.send_error(stream_id, exc.code, str(exc), exc.reason)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.send_error(stream_id, INTERNAL, f"{exc.__class__.__name__}: {exc}")
        finally:
            stream = self.streams.pop(stream_id, None)
            if isinstance(stream, Process):
                stream.kill(signal.SIGKILL)
                stream._close_fds()
            self.tasks.pop(stream_id, None)

    def cancel_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if isinstance(stream, Process):
            stream.kill(signal.SIGKILL)  # run() then reports the exit as usual
        else:
            task = self.tasks.get(stream_id)
            if task:
                task.cancel()

    def cancel_all(self) -> None:
        for stream_id in list(self.tasks):
            stream = self.streams.get(stream_id)
            if isinstance(stream, Process):
                stream.kill(signal.SIGKILL)
            task = self.tasks.get(stream_id)
            if task:
                task.cancel()

    @property
    def hostname(self) -> str:
        return self.simulated_hostname if self.simulated else self.given_hostname or os.uname().nodename

    def _set_identity(self, identity: agent_pb2.SetIdentity) -> None:
        if not self.is_init and not self.simulated:
            # Only the guest's PID 1 renames its system: an agent run on a host (a test's) never renames the host or
            # rewrites its /etc/hosts, as it never sets the host's clock. It answers with the name it was given.
            self.given_hostname = identity.hostname or self.given_hostname
            return
        if self.simulated:
            self.simulated_hostname = identity.hostname or self.simulated_hostname
            if self.own_uts:  # its own UTS namespace: the processes it starts see the name too
                socket.sethostname(self.simulated_hostname)
            return
        try:
            if identity.hostname:
                system.set_hostname(identity.hostname)
            if identity.entropy:
                system.add_entropy(identity.entropy)
        except OSError as exc:
            self.send_error(0, INTERNAL, f"set identity: {exc}")

    def _set_clock(self, unix_time_ns: int) -> None:
        if not self.is_init:
            self.simulated_clock_offset_ns = unix_time_ns - time.time_ns()
            return
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, unix_time_ns)
        except (OSError, OverflowError) as exc:
            self.send_error(0, INVALID_ARGUMENT, f"set clock: {exc}")

    # --- the channel -----------------------------------------------------------------------------
    async def serve(self, transport) -> None:
        """Runs the protocol over `transport` until it closes; streams of that connection are cancelled."""
        decoder = FrameDecoder()
        writer = asyncio.create_task(self._write_loop(transport))
        self._transport = transport
        self.send(
            0,
            hello=agent_pb2.Hello(
                protocol_version=PROTOCOL_VERSION,
                boot_id=self.boot_id,
                hostname=self.hostname,
                initial_window=self.initial_window,
            ),
        )
        try:
            while True:
                data = await transport.read(MAX_FRAME_BYTES)
                if not data:
                    return
                try:
                    bodies = decoder.feed(data)
                except FrameTooLarge as exc:
                    self.send_error(0, INVALID_ARGUMENT, str(exc))
                    continue
                for body in bodies:
                    self.dispatch(body)
        finally:
            self._transport = None
            writer.cancel()
            self.cancel_all()
            self._outgoing.clear()

    async def _write_loop(self, transport) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._outgoing:
                self._writer_idle = loop.create_future()
                await self._writer_idle
            # Hand over what is queued in one call, without copying.
            buffers, self._outgoing = self._outgoing, []
            await transport.write_buffers(buffers)
