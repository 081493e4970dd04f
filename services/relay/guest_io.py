"""Conversions between the public exec/file messages and the agent's frames, shared by processes and files."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import InvalidArgument, error_from_code
from services.common.validation import check_process

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
