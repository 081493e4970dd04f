"""Conversions between the public exec/file messages and the agent's frames, and the credit-bounded sending of a
client stream's data, shared by processes, files and archives."""

from __future__ import annotations

import asyncio

from google.protobuf import timestamp_pb2

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument, error_from_code
from services.common.validation import check_process

MAX_CHUNK = 1 << 20
# Credit a read grants the agent beyond its window as it starts: the next chunk travels while one goes out over gRPC
# (twice the window per stream in flight, well inside the relay's per-stream bound; the agent grants writes the same).
READ_AHEAD = 1 << 20
FILE_TYPE = {
    agent_pb2.FILE_KIND_FILE: sandbox_pb2.FILE_TYPE_FILE,
    agent_pb2.FILE_KIND_DIRECTORY: sandbox_pb2.FILE_TYPE_DIRECTORY,
    agent_pb2.FILE_KIND_SYMLINK: sandbox_pb2.FILE_TYPE_SYMLINK,
}


def sandbox_id(name: str) -> str:
    """The VM id of `sandboxes/{id}` (a sandbox's VM has its id)."""
    prefix, _, vm_id = name.partition("/")
    if prefix != "sandboxes" or not vm_id or "/" in vm_id:
        raise InvalidArgument(f"{name!r} is not a sandbox name; expected sandboxes/{{id}}", reason="INVALID_NAME")
    return vm_id


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


def exec_start(process: api.ProcessConfig, has_stdin: bool) -> agent_pb2.ExecStart:
    check_process(process)
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


def failure(frame: agent_pb2.Frame) -> Exception:
    return error_from_code(frame.error.code, frame.error.message, frame.error.reason or None)


async def receive_data(stream, **start):
    """Sends the `start` frame, then yields the data of the FileData frames the agent answers with, granting credit
    as each chunk is taken, up to eof; an error frame raises its status. Abandoned early, the agent stream is
    cancelled."""
    finished = False
    try:
        await stream.send(**start)
        await stream.grant(READ_AHEAD)
        while True:
            frame = await stream.receive()
            kind = frame.WhichOneof("body")
            if kind == "error":
                finished = True
                raise failure(frame)
            if kind == "file_data":
                if frame.file_data.data:
                    yield frame.file_data.data
                    await stream.grant(len(frame.file_data.data))
                if frame.file_data.eof:
                    finished = True
                    return
    finally:
        await stream.close(cancel=not finished)


async def send_within_credit(stream, requests, final_kinds: tuple[str, ...]) -> agent_pb2.Frame:
    """Forwards the `data` of each request (after the header, already taken) as FileData frames, never beyond the
    credit the agent granted; returns the agent's last frame (one of `final_kinds`, or error). Stops early when the
    agent answers before the data ends (it failed: its answer says why)."""
    window = stream.channel.hello.initial_window if stream.channel.hello else 1 << 20
    credit = {"bytes": window}
    granted = asyncio.Event()

    async def watch_agent() -> agent_pb2.Frame:
        while True:
            frame = await stream.receive()
            kind = frame.WhichOneof("body")
            if kind == "window_update":
                credit["bytes"] += frame.window_update.increment
                granted.set()
            elif kind in final_kinds or kind == "error":
                return frame

    watcher = asyncio.create_task(watch_agent())
    try:
        async for message in requests:
            if message.WhichOneof("request") != "data":
                raise InvalidArgument("only data messages may follow the header")
            data = message.data
            if len(data) > MAX_CHUNK:
                raise InvalidArgument(f"a chunk is at most {MAX_CHUNK} bytes")
            while credit["bytes"] < min(len(data), window) and not watcher.done():
                granted.clear()
                waiting = asyncio.ensure_future(granted.wait())
                await asyncio.wait([watcher, waiting], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
            if watcher.done():
                break
            credit["bytes"] -= len(data)
            await stream.send(file_data=agent_pb2.FileData(data=data))
        if not watcher.done():
            await stream.send(file_data=agent_pb2.FileData(eof=True))
        return await watcher
    finally:
        watcher.cancel()
