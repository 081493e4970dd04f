"""A context backed by one persistent child process of the server (a bash shell, a Node.js driver) instead of a
Jupyter kernel: a run hands the process its code and a random end marker; the process writes the code's output to
its stdout and stderr pipes, streamed as events, then the marker on both, followed on stdout by a trailer line
(the run's status, its results and errors: the kind's `finish` reads it). The marker is new for every run, so no
output of the code can end a run early.

A timeout or an interrupt sends SIGINT to the process group; code that still runs INTERRUPT_GRACE_SECONDS later is
killed with the process (its state is lost, reported as `kernel_died`), as is code whose process exits. The next run
then starts a fresh process and says `restarted`.
"""

import asyncio
import codecs
import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

from context_base import (
    INTERRUPT_GRACE_SECONDS,
    Context,
    OutputBound,
    end_event,
    error_event,
    timeout_event,
)

READ_BYTES = 64 * 1024
DRAIN_SECONDS = 1.0  # after one pipe closed, how long the other may still deliver what it held


@dataclass
class ProcessContext(Context):
    process: asyncio.subprocess.Process | None = None
    execution_count: int = 0
    interrupted: bool = False  # a SIGINT was sent during the current run
    stale_marker: bytes | None = None  # the marker of a run whose client left before it ended
    kind_name: str = "process"  # how errors name the process: "bash shell", "Node.js process"
    leftover: dict = field(default_factory=dict)  # stream name -> bytes read past the last run's trailer

    async def spawn(self) -> asyncio.subprocess.Process:
        """Starts the kind's process: stdout and stderr are pipes, its own session (process group)."""
        raise NotImplementedError

    async def send_run(self, code: str, marker: str, env: dict[str, str]) -> None:
        """Hands the process one run."""
        raise NotImplementedError

    def finish(self, trailer: str, timed_out: bool) -> tuple[str, list[dict]]:
        """The run's status ("ok" | "error") and its closing events, from the trailer after the stdout marker."""
        raise NotImplementedError

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await self.spawn()
        self.execution_count, self.stale_marker, self.leftover = 0, None, {}

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the process and whatever it started in its group
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def interrupt(self) -> None:
        if self.alive():
            self.interrupted = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGINT)

    async def run(self, code: str, timeout: float | None, max_output_bytes: int, env=None):
        """Runs `code`, yielding events; the last is `end`. Callers hold `self.lock`."""
        restarted = False
        if not self.alive():
            await self.restart()
            restarted = True
        self.execution_count += 1
        execution_count, output = self.execution_count, OutputBound(max_output_bytes)
        marker = f"MVM-END-{uuid.uuid4().hex}"
        self.interrupted = False
        await self.send_run(code, marker, env or {})
        queue: asyncio.Queue = asyncio.Queue()
        readers = [
            asyncio.ensure_future(self._read(self.process.stdout, "stdout", marker.encode(), queue)),
            asyncio.ensure_future(self._read(self.process.stderr, "stderr", marker.encode(), queue)),
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        status, timed_out, trailer, ended, closed = "ok", False, None, 0, False
        try:
            while ended < 2:
                if deadline is not None and time.monotonic() >= deadline:
                    if closed:  # what the other pipe still held has had its time to come
                        break
                    if timed_out:  # SIGINT did not end the code within its grace: kill it, and the state
                        yield self._died("did not stop after SIGINT and was killed")
                        await self.stop()
                        status = "kernel_died"
                        break
                    timed_out, status = True, "timeout"
                    await self.interrupt()
                    deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                    yield timeout_event(timeout)
                wait = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    name, text, end = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    continue
                if text:
                    event = {"type": name, "text": text}
                    if output.admit(event):
                        yield event
                if end is None:
                    continue
                ended += 1
                if end is False and not closed:  # a pipe closed: the process is gone, or going
                    closed, deadline = True, time.monotonic() + DRAIN_SECONDS
                elif name == "stdout":
                    trailer = end
            if closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), DRAIN_SECONDS)
                code = self.process.returncode
                yield self._died(
                    f"exited (exit code {code}) while running this code" if code is not None else "closed its output"
                )
                await self.stop()
                status = "kernel_died"
            elif status != "kernel_died":
                finished, events = self.finish(trailer, timed_out)
                status = status if timed_out else finished
                for event in events:
                    if output.admit(event):
                        yield event
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            # a run left before its end (its client went away): the next one skips what is left of it
            self.stale_marker = marker.encode() if ended < 2 and self.alive() else None
        yield end_event(execution_count, status, restarted, output)

    def _died(self, how: str) -> dict:
        return error_event(
            "KernelDied",
            f"the {self.kind_name} of context {self.id!r} {how}; its state is lost and the next run in this context "
            "starts a fresh one",
        )

    async def _read(self, stream: asyncio.StreamReader, name: str, marker: bytes, queue: asyncio.Queue) -> None:
        """Puts (name, text, end) on the queue: end is None while output flows, the trailer (str) after the marker,
        False when the pipe closed first. What follows the trailer's line (output of a background job) is kept
        for the next run."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buffer = self.leftover.pop(name, b"")
        if self.stale_marker is not None:
            buffer = await self._skip_past(stream, self.stale_marker, buffer)
            if buffer is None:
                await queue.put((name, "", False))
                return
        while True:
            at = buffer.find(marker)
            if at >= 0:
                rest = buffer[at + len(marker) :]
                while b"\n" not in rest and (chunk := await stream.read(READ_BYTES)):
                    rest += chunk
                trailer, _, self.leftover[name] = rest.partition(b"\n")
                await queue.put((name, decoder.decode(buffer[:at], final=True), trailer.decode(errors="replace")))
                return
            keep = len(marker) - 1  # a marker may be split between reads
            if len(buffer) > keep:
                text, buffer = decoder.decode(buffer[:-keep]), buffer[-keep:]
                if text:
                    await queue.put((name, text, None))
            chunk = await stream.read(READ_BYTES)
            if not chunk:
                await queue.put((name, decoder.decode(buffer, final=True), False))
                return
            buffer += chunk

    @staticmethod
    async def _skip_past(stream: asyncio.StreamReader, marker: bytes, buffer: bytes) -> bytes | None:
        """What follows the line of `marker` (an abandoned run's), or None if the pipe closed first."""
        while True:
            at = buffer.find(marker)
            if at >= 0:
                newline = buffer.find(b"\n", at)
                if newline >= 0:
                    return buffer[newline + 1 :]
                buffer = buffer[at:]
            else:
                buffer = buffer[-(len(marker) - 1) :]
            chunk = await stream.read(READ_BYTES)
            if not chunk:
                return None
            buffer += chunk
