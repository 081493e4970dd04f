"""Background processes: started on a stream that ends at once, they run on whoever is connected (a relay
restart, a dropped connection), their output kept in a bounded buffer that followers replay from.

- `ProcessStarter` (process_start): spawns a `Detached` process, answers process_info.
- `ProcessFollower` (process_attach): output from up to `tail_bytes` back, then exec_exited; cancelling it only
  stops following.
- `ProcessLister` (process_list) and `ProcessController` (process_control: stdin, end of stdin, a signal).

Bounds: MAX_RUNNING processes at a time, the newest KEPT_EXITED ended ones remembered, OUTPUT_BUFFER bytes of
output each (the newest). A follower slower than its process skips what the buffer no longer holds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from microvm.agent.v1 import agent_pb2
from microvm_agent.processes import Process, grow_pipe
from microvm_agent.streams import (
    DRAIN_AFTER_EXIT_SECONDS,
    FAILED_PRECONDITION,
    FULL_PIPE_BYTES,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OUTPUT_CHUNK,
    RESOURCE_EXHAUSTED,
    Credit,
    StreamError,
    read_fd,
    wait_readable,
    write_fd,
)

if TYPE_CHECKING:
    from microvm_agent.agent import Agent

MAX_RUNNING = 64
KEPT_EXITED = 32
OUTPUT_BUFFER = 1 << 20
MAX_TAG = 256
MAX_SIGNAL = 64


class OutputBuffer:
    """The newest `capacity` bytes a process wrote, as (offset, channel, data) chunks; offsets count every byte
    ever written, so a follower knows what it missed."""

    def __init__(self, capacity: int = OUTPUT_BUFFER) -> None:
        self.capacity = capacity
        self.chunks: deque[tuple[int, int, bytes]] = deque()
        self.start = self.end = 0  # offsets of the oldest byte held and one past the newest
        self.closed = False  # the process ended and its pipes are drained
        self._waiters: list[asyncio.Future] = []

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def wait_beyond(self, offset: int) -> None:
        """Returns once there are bytes past `offset`, or the output is closed."""
        if self.end > offset or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def append(self, channel: int, data: bytes) -> None:
        self.chunks.append((self.end, channel, data))
        self.end += len(data)
        while self.end - self.chunks[0][0] - len(self.chunks[0][2]) >= self.capacity:
            self.chunks.popleft()
        self.start = max(self.chunks[0][0], self.end - self.capacity) if self.chunks else self.end
        self._wake()

    def read(self, offset: int, most: int) -> tuple[int, int, bytes] | None:
        """The bytes from `offset` (moved up to what is still held) of one chunk, at most `most`: (offset, channel,
        data), or None when there is nothing new."""
        offset = max(offset, self.start)
        for chunk_offset, channel, data in self.chunks:
            if chunk_offset + len(data) > offset:
                skip = offset - chunk_offset
                return offset, channel, data[skip : skip + most]
        return None


class Detached(Process):
    """A process that belongs to no stream: its output goes to its buffer, its end is kept for listing."""

    def __init__(self, agent: Agent, start: agent_pb2.ExecStart, tag: str) -> None:
        super().__init__(agent, 0, start)
        self.tag = tag
        self.output = OutputBuffer()
        self.exited: agent_pb2.ExecExited | None = None
        self.start_time_ns = time.time_ns()

    def begin(self) -> None:
        fds = self._spawn()
        if self.start.timeout_ms:
            asyncio.get_running_loop().call_later(self.start.timeout_ms / 1000, self._on_timeout)
        channels = (
            [agent_pb2.OUTPUT_CHANNEL_STDOUT]
            if self.pty_master is not None
            else [agent_pb2.OUTPUT_CHANNEL_STDOUT, agent_pb2.OUTPUT_CHANNEL_STDERR]
        )
        pumps = [asyncio.create_task(self._collect(fd, channel)) for fd, channel in zip(fds, channels, strict=True)]
        if self.stdin_fd is not None:
            self.tasks.append(asyncio.create_task(self._feed_stdin()))
        self.tasks.append(asyncio.create_task(self._watch(pumps)))

    async def _collect(self, fd: int, channel: int) -> None:
        while True:
            await wait_readable(fd)
            data = await read_fd(fd, OUTPUT_CHUNK)
            if not data:
                return
            if len(data) >= FULL_PIPE_BYTES and self.pty_master is None:
                grow_pipe(fd)
            self.output.append(channel, data)

    async def _watch(self, pumps: list[asyncio.Task]) -> None:
        status = await self.exit_status
        _, pending = await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._close_fds()
        exited = agent_pb2.ExecExited(timed_out=self.timed_out)
        if os.WIFSIGNALED(status):
            exited.signal = os.WTERMSIG(status)
        else:
            exited.exit_code = os.WEXITSTATUS(status)
        self.exited = exited
        self.output.close()
        Registry.of(self.agent).ended(self)

    def info(self) -> agent_pb2.ProcessInfo:
        info = agent_pb2.ProcessInfo(
            pid=self.child.pid,
            argv=self.start.argv,
            tag=self.tag,
            cwd=self.start.cwd,
            running=self.exited is None,
            start_time_ns=self.start_time_ns,
            output_bytes=self.output.end,
        )
        if self.exited is not None:
            info.exited.CopyFrom(self.exited)
        return info


class Registry:
    """The agent's background processes, running and recently ended."""

    def __init__(self) -> None:
        self.running: dict[int, Detached] = {}
        self.ended_ones: deque[Detached] = deque(maxlen=KEPT_EXITED)

    @staticmethod
    def of(agent: Agent) -> Registry:
        registry = getattr(agent, "_background", None)
        if registry is None:
            registry = agent._background = Registry()
        return registry

    def start(self, agent: Agent, start: agent_pb2.ProcessStart) -> Detached:
        if len(start.tag.encode()) > MAX_TAG:
            raise StreamError(INVALID_ARGUMENT, f"tag is longer than {MAX_TAG} bytes")
        if len(self.running) >= MAX_RUNNING:
            raise StreamError(
                RESOURCE_EXHAUSTED, f"{MAX_RUNNING} background processes already run", reason="TOO_MANY_PROCESSES"
            )
        process = Detached(agent, start.exec, start.tag)
        process.begin()
        self.running[process.child.pid] = process
        return process

    def ended(self, process: Detached) -> None:
        self.running.pop(process.child.pid, None)
        self.ended_ones.append(process)

    def get(self, pid: int) -> Detached:
        process = self.running.get(pid) or next((p for p in self.ended_ones if p.child.pid == pid), None)
        if process is None:
            raise StreamError(NOT_FOUND, f"no background process {pid}", reason="PROCESS_NOT_FOUND")
        return process

    def all(self) -> list[Detached]:
        return sorted([*self.running.values(), *self.ended_ones], key=lambda p: p.start_time_ns)


class _Unary:
    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id

    def handle(self, frame: agent_pb2.Frame) -> None:
        pass


class ProcessStarter(_Unary):
    async def run(self, start: agent_pb2.ProcessStart) -> None:
        process = Registry.of(self.agent).start(self.agent, start)
        self.agent.send(self.stream_id, process_info=process.info())


class ProcessLister(_Unary):
    async def run(self, request: agent_pb2.ProcessListRequest) -> None:
        listing = agent_pb2.ProcessListing(processes=[p.info() for p in Registry.of(self.agent).all()])
        self.agent.send(self.stream_id, process_listing=listing)


class ProcessController(_Unary):
    async def run(self, control: agent_pb2.ProcessControl) -> None:
        process = Registry.of(self.agent).get(control.pid)
        if not 0 <= control.signal <= MAX_SIGNAL:
            raise StreamError(INVALID_ARGUMENT, f"signal must be between 1 and {MAX_SIGNAL}")
        if control.stdin or control.close_stdin:
            if process.exited is not None:
                raise StreamError(FAILED_PRECONDITION, f"process {control.pid} has ended", reason="PROCESS_ENDED")
            if process.stdin_fd is None:
                raise StreamError(
                    FAILED_PRECONDITION,
                    f"process {control.pid} takes no input (start it with stdin) or its input was closed",
                    reason="PROCESS_STDIN_CLOSED",
                )
            if control.stdin:
                try:
                    await write_fd(process.stdin_fd, control.stdin)
                except OSError as exc:
                    raise StreamError(FAILED_PRECONDITION, f"stdin of process {control.pid}: {exc}") from None
            if control.close_stdin:
                process.stdin_queue.put_nowait(None)
        if control.signal:
            process.kill(control.signal)
        self.agent.send(self.stream_id, process_info=process.info())


class ProcessFollower:
    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id
        self.credit = Credit(agent.initial_window)

    def handle(self, frame: agent_pb2.Frame) -> None:
        if frame.WhichOneof("body") == "window_update":
            self.credit.grant(frame.window_update.increment)

    async def run(self, attach: agent_pb2.ProcessAttach) -> None:
        process = Registry.of(self.agent).get(attach.pid)
        output = process.output
        offset = max(output.start, output.end - min(attach.tail_bytes, output.capacity))
        while True:
            while (chunk := output.read(offset, OUTPUT_CHUNK)) is not None:
                chunk_offset, channel, data = chunk
                allowed = await self.credit.take(len(data))
                self.agent.send(self.stream_id, output=agent_pb2.Output(channel=channel, data=data[:allowed]))
                offset = chunk_offset + allowed
            if output.closed:
                self.agent.send(self.stream_id, exec_exited=process.exited)
                return
            await output.wait_beyond(offset)


STREAMS = {
    "process_start": ProcessStarter,
    "process_attach": ProcessFollower,
    "process_list": ProcessLister,
    "process_control": ProcessController,
}
