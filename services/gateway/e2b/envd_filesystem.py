"""E2B's `filesystem.Filesystem` (Stat, MakeDir, Move, ListDir, Remove, WatchDir) onto our file RPCs.

envd's semantics where ours differ, kept as the SDK expects them: MakeDir creates parents and answers
`already_exists` for an existing path (the SDK's make_dir returns False then); Move replaces an existing
destination (a rename(2)); Remove removes a directory with its contents; ListDir walks `depth` levels (our
ListDir is one level, so this is one call per directory, at most MAX_LISTED entries in all). A watch event names
its entry relative to the watched directory, as envd's do.
"""

from __future__ import annotations

import posixpath
import stat as stat_bits
from collections.abc import AsyncIterator

import grpc
from e2b_envd import filesystem_pb2 as e2b

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b.connect_protocol import ConnectError, ConnectRequest
from services.gateway.e2b.envd_users import absolute, user_from_basic_auth
from services.gateway.e2b.sandbox_call import SandboxCall

RPC_SECONDS = 30.0
MAX_LISTED = 100_000  # entries one ListDir answers at most, whatever the depth

FILE_TYPES = {
    sandbox_pb2.FILE_TYPE_FILE: (e2b.FILE_TYPE_FILE, stat_bits.S_IFREG),
    sandbox_pb2.FILE_TYPE_DIRECTORY: (e2b.FILE_TYPE_DIRECTORY, stat_bits.S_IFDIR),
    sandbox_pb2.FILE_TYPE_SYMLINK: (e2b.FILE_TYPE_SYMLINK, stat_bits.S_IFLNK),
}
EVENT_TYPES = {
    api.FILE_EVENT_TYPE_CREATE: e2b.EVENT_TYPE_CREATE,
    api.FILE_EVENT_TYPE_WRITE: e2b.EVENT_TYPE_WRITE,
    api.FILE_EVENT_TYPE_REMOVE: e2b.EVENT_TYPE_REMOVE,
    api.FILE_EVENT_TYPE_RENAME: e2b.EVENT_TYPE_RENAME,
    api.FILE_EVENT_TYPE_CHMOD: e2b.EVENT_TYPE_CHMOD,
}


def _stub(call: SandboxCall) -> sandbox_service_pb2_grpc.SandboxServiceStub:
    return sandbox_service_pb2_grpc.SandboxServiceStub(call.channel)


def request_path(rpc: ConnectRequest, path: str, what: str = "path") -> str:
    return absolute(path, user_from_basic_auth(rpc.headers.get("Authorization")), what)


def _account(number: int) -> str:
    return "root" if number == 0 else str(number)


def entry_info(file: sandbox_pb2.FileInfo) -> e2b.EntryInfo:
    """Ours as envd's: the name, the Unix permission string (`-rw-r--r--`), owner and group by name where we know
    it (root) and by number otherwise."""
    kind, type_bits = FILE_TYPES.get(file.type, (e2b.FILE_TYPE_UNSPECIFIED, 0))
    entry = e2b.EntryInfo(
        name=posixpath.basename(file.path) or "/",
        type=kind,
        path=file.path,
        size=file.size,
        mode=file.mode,
        permissions=stat_bits.filemode(type_bits | file.mode),
        owner=_account(file.uid),
        group=_account(file.gid),
    )
    entry.modified_time.CopyFrom(file.modify_time)
    if file.symlink_target:
        entry.symlink_target = file.symlink_target
    return entry


async def _stat(call: SandboxCall, path: str) -> sandbox_pb2.FileInfo:
    reply = await _stub(call).Stat(
        api.StatRequest(sandbox=f"sandboxes/{call.sandbox}", path=path), metadata=call.metadata, timeout=RPC_SECONDS
    )
    return reply.file


async def stat(request: e2b.StatRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.StatResponse:
    return e2b.StatResponse(entry=entry_info(await _stat(call, request_path(rpc, request.path))))


async def make_dir(request: e2b.MakeDirRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.MakeDirResponse:
    path = request_path(rpc, request.path)
    try:
        existing = await _stat(call, path)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    else:
        what = "directory" if existing.type == sandbox_pb2.FILE_TYPE_DIRECTORY else "file"
        raise ConnectError("already_exists", f"{what} {path!r} already exists")
    reply = await _stub(call).MakeDir(
        api.MakeDirRequest(sandbox=f"sandboxes/{call.sandbox}", path=path, parents=True),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    )
    return e2b.MakeDirResponse(entry=entry_info(reply.directory))


async def move(request: e2b.MoveRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.MoveResponse:
    reply = await _stub(call).Rename(
        api.RenameRequest(
            sandbox=f"sandboxes/{call.sandbox}",
            source=request_path(rpc, request.source, "source"),
            destination=request_path(rpc, request.destination, "destination"),
            overwrite=True,
        ),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    )
    return e2b.MoveResponse(entry=entry_info(reply.file))


async def remove(request: e2b.RemoveRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.RemoveResponse:
    await _stub(call).Remove(
        api.RemoveRequest(sandbox=f"sandboxes/{call.sandbox}", path=request_path(rpc, request.path), recursive=True),
        metadata=call.metadata,
        timeout=RPC_SECONDS,
    )
    return e2b.RemoveResponse()


async def list_dir(request: e2b.ListDirRequest, rpc: ConnectRequest, call: SandboxCall) -> e2b.ListDirResponse:
    """Breadth-first to `depth` levels (0 counts as 1, as in envd); symbolic links are listed, not followed."""
    root, depth = request_path(rpc, request.path), max(request.depth, 1)
    reply, level = e2b.ListDirResponse(), [root]
    for current_depth in range(1, depth + 1):
        below = []
        for directory in level:
            listed = await _stub(call).ListDir(
                api.ListDirRequest(sandbox=f"sandboxes/{call.sandbox}", path=directory),
                metadata=call.metadata,
                timeout=RPC_SECONDS,
            )
            for file in listed.entries:
                if len(reply.entries) >= MAX_LISTED:
                    raise ConnectError("resource_exhausted", f"more than {MAX_LISTED} entries: list less deep")
                reply.entries.append(entry_info(file))
                if file.type == sandbox_pb2.FILE_TYPE_DIRECTORY and current_depth < depth:
                    below.append(file.path)
        level = below
    return reply


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path.startswith(root.rstrip("/") + "/") else path


async def watch_events(
    call: SandboxCall, root: str, recursive: bool, include_entry: bool, timeout: float | None
) -> AsyncIterator[e2b.WatchDirResponse]:
    """Our WatchDir as E2B's: `start` once the watch is in place, then each change (a RENAME reports the new name,
    as envd's fsnotify does for the entry that appears) and keepalives."""
    stream = _stub(call).WatchDir(
        api.WatchDirRequest(sandbox=f"sandboxes/{call.sandbox}", path=root, recursive=recursive),
        metadata=call.metadata,
        timeout=timeout,
    )
    try:
        async for response in stream:
            which = response.WhichOneof("event")
            if which == "started":
                yield e2b.WatchDirResponse(start=e2b.WatchDirResponse.StartEvent())
            elif which == "keepalive":
                yield e2b.WatchDirResponse(keepalive=e2b.WatchDirResponse.KeepAlive())
            elif which == "overflow":
                raise ConnectError("resource_exhausted", "the watch dropped changes (they came faster than read)")
            elif which == "change" and response.change.type in EVENT_TYPES:
                change = response.change
                event = e2b.FilesystemEvent(name=_relative(change.path, root), type=EVENT_TYPES[change.type])
                if include_entry and change.type != api.FILE_EVENT_TYPE_REMOVE:
                    try:
                        event.entry.CopyFrom(entry_info(await _stat(call, change.path)))
                    except Exception:  # gone again already: envd leaves the entry out too
                        pass
                yield e2b.WatchDirResponse(filesystem=event)
    finally:
        stream.cancel()


async def watch_dir(request: e2b.WatchDirRequest, rpc: ConnectRequest, call: SandboxCall) -> AsyncIterator:
    root = request_path(rpc, request.path)
    async for response in watch_events(call, root, request.recursive, request.include_entry, rpc.timeout):
        yield response
