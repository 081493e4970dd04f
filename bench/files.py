"""`make bench` (files): 1 GiB up and down through the whole system vs the raw agent channel, in the same run.

- files_upload_1gib: the SDK writes 1 GiB (a sparse local file, read in chunks) to the guest's /dev/null
  (append, so nothing is stored: the guest's disk and RAM are smaller than 1 GiB): SDK -> gateway -> relay ->
  agent. Baseline: the same 1 GiB of FileData frames sent straight on the agent channel of a hand-booted guest
  of the same image and size (AgentChannel, within the agent's credit, as the relay does).
- files_download_1gib: the SDK reads 1 GiB of the guest's /dev/zero (ReadFile with a length) into a local file;
  baseline: the same read straight off the raw agent channel.
- files_client_peak_rss: the SDK process's peak resident memory (VmHWM) over both transfers, vs its peak right
  after importing the SDK and connecting.

Values are MB/s (the ratio is gateway / raw, goal >= 0.9) and MiB. Never fails on a figure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.raw_vm import raw_boot
from bench.run import emit
from microvm.agent.v1 import agent_pb2
from services.relay.agent_channel import AgentChannel
from services.relay.guest_io import READ_AHEAD
from tests.stack import REPO, start_stack

SIZE = 1 << 30
CHUNK = 1 << 20

CLIENT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from microvm_sandbox.aio import AsyncClient, AsyncSandbox

    def peak_mib():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024

    async def main():
        address, key, source, target, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        async with AsyncClient(address, key) as client:
            sandbox = await AsyncSandbox.create(client=client)
            try:
                await sandbox.files.write("/tmp/warm", b"x")
                connected = peak_mib()
                started = time.perf_counter()
                with open(source, "rb") as handle:
                    await sandbox.files.write("/dev/null", handle, append=True, mode=0o666)
                upload = size / (time.perf_counter() - started) / 1e6
                started = time.perf_counter()
                with open(target, "wb") as out:
                    async for chunk in sandbox.files.read_stream("/dev/zero", length=size):
                        out.write(chunk)
                download = size / (time.perf_counter() - started) / 1e6
                assert os.path.getsize(target) == size
            finally:
                await sandbox.kill()
        print(json.dumps({"upload": upload, "download": download, "peak": peak_mib(), "connected": connected}))

    asyncio.run(main())
    """
)


async def raw_upload(channel: AgentChannel) -> float:
    """1 GiB of FileData on the raw channel into /dev/null, sent only within the agent's credit."""
    stream = channel.open_stream()
    credit, granted = channel.hello.initial_window, asyncio.Event()
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        nonlocal credit
        while True:
            frame = await stream.receive()
            kind = frame.WhichOneof("body")
            if kind == "window_update":
                credit += frame.window_update.increment
                granted.set()
            elif kind in ("file_write_done", "error"):
                done.set_result(frame)
                return

    watcher = asyncio.ensure_future(watch())
    chunk = bytes(CHUNK)
    started = time.perf_counter()
    await stream.send(file_write_start=agent_pb2.FileWriteStart(path="/dev/null", mode=0o666, append=True))
    for _ in range(SIZE // CHUNK):
        while credit < CHUNK:
            granted.clear()
            await granted.wait()
        credit -= CHUNK
        await stream.send(file_data=agent_pb2.FileData(data=chunk))
    await stream.send(file_data=agent_pb2.FileData(eof=True))
    frame = await done
    watcher.cancel()
    assert frame.WhichOneof("body") == "file_write_done", frame
    return SIZE / (time.perf_counter() - started) / 1e6


async def raw_download(channel: AgentChannel, target: Path) -> float:
    """1 GiB of /dev/zero read straight off the raw channel into a local file, granting credit as it is written."""
    stream = channel.open_stream()
    started = time.perf_counter()
    await stream.send(file_read_start=agent_pb2.FileReadStart(path="/dev/zero", length=SIZE))
    await stream.grant(READ_AHEAD)  # as the relay does
    total = 0
    with open(target, "wb") as out:
        while True:
            frame = await stream.receive()
            kind = frame.WhichOneof("body")
            if kind == "error":
                raise RuntimeError(frame.error.message)
            if frame.file_data.data:
                out.write(frame.file_data.data)
                total += len(frame.file_data.data)
                await stream.grant(len(frame.file_data.data))
            if frame.file_data.eof:
                break
    assert total == SIZE, total
    return SIZE / (time.perf_counter() - started) / 1e6


def through_gateway(stack, directory: Path) -> dict:
    source = directory / "upload.bin"
    with open(source, "wb") as handle:
        handle.truncate(SIZE)  # sparse: the client reads zeros from the page cache
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "gen" / "python"), str(REPO / "clients/python/src")]))
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, stack.gateway_address, stack.admin_key, str(source), str(directory / "down")]
        + [str(SIZE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-files-") as tmp:
        stack = start_stack(Path(tmp) / "stack")
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        loop = asyncio.new_event_loop()
        raw_pid = 0
        try:
            _, channel, raw_pid = loop.run_until_complete(raw_boot(raw_dir))
            raw_up = loop.run_until_complete(raw_upload(channel))
            raw_down = loop.run_until_complete(raw_download(channel, Path(tmp) / "raw-down"))
            os.unlink(Path(tmp) / "raw-down")
            loop.run_until_complete(channel.close())
            os.kill(raw_pid, signal.SIGKILL)
            raw_pid = 0
            measured = through_gateway(stack, Path(tmp))
            emit("files_upload_1gib", measured["upload"], "MB/s", raw_up, "raw agent channel upload", "ratio >= 0.9")
            emit(
                "files_download_1gib",
                measured["download"],
                "MB/s",
                raw_down,
                "raw agent channel download",
                "ratio >= 0.9",
            )
            emit(
                "files_client_peak_rss",
                measured["peak"],
                "MiB",
                measured["connected"],
                "the same client before the transfers",
                "value < 64",
            )
        finally:
            if raw_pid:
                os.kill(raw_pid, signal.SIGKILL)
            loop.close()
            stack.stop()


if __name__ == "__main__":
    main()
