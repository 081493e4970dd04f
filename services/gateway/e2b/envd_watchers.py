"""envd's polled watches: CreateWatcher, GetWatcherEvents, RemoveWatcher (the SDK's streaming-free watch).

Each watcher is our WatchDir, followed by a task of the gateway that keeps what happened until it is asked for.
Bounded, as state the gateway keeps for callers must be: at most MAX_PER_SANDBOX watchers per caller and sandbox,
at most MAX_EVENTS events kept each (more ends the watcher: its next poll answers `resource_exhausted`, as a
watch that lost events must not look complete), and a watcher nobody polled for IDLE_SECONDS is removed. They are
found by (caller's credential, sandbox, id), so one tenant never reads another's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from e2b_envd import filesystem_pb2 as e2b

from services.gateway.e2b.connect_protocol import ConnectError, ConnectRequest
from services.gateway.e2b.envd_filesystem import request_path, watch_events
from services.gateway.e2b.sandbox_call import SandboxCall

MAX_PER_SANDBOX = 16
MAX_EVENTS = 10_000
IDLE_SECONDS = 600.0


@dataclass(eq=False)
class Watcher:
    events: list = field(default_factory=list)
    failure: ConnectError | None = None
    polled: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None


_watchers: dict[tuple, Watcher] = {}


def _expire() -> None:
    now = time.monotonic()
    for key, watcher in list(_watchers.items()):
        if now - watcher.polled > IDLE_SECONDS:
            _drop(key)


def _drop(key: tuple) -> None:
    if (watcher := _watchers.pop(key, None)) and watcher.task:
        watcher.task.cancel()


async def _follow(call: SandboxCall, watcher: Watcher, root: str, request, started: asyncio.Future) -> None:
    try:
        async for response in watch_events(call, root, request.recursive, request.include_entry, None):
            if response.HasField("start") and not started.done():
                started.set_result(None)
            elif response.HasField("filesystem"):
                if len(watcher.events) >= MAX_EVENTS:
                    raise ConnectError("resource_exhausted", f"more than {MAX_EVENTS} events waited for a poll")
                watcher.events.append(response.filesystem)
    except Exception as error:
        failure = error if isinstance(error, ConnectError) else ConnectError.from_grpc(error)
        if not started.done():
            started.set_exception(failure)
        watcher.failure = failure
        return
    if not started.done():
        started.set_exception(ConnectError("internal", "the watch ended before it started"))
    watcher.failure = ConnectError("unavailable", "the watch ended")


async def create_watcher(request: e2b.CreateWatcherRequest, rpc: ConnectRequest, call: SandboxCall):
    _expire()
    if sum(1 for key in _watchers if key[:2] == (call.metadata, call.sandbox)) >= MAX_PER_SANDBOX:
        raise ConnectError("resource_exhausted", f"at most {MAX_PER_SANDBOX} watchers per sandbox")
    watcher, watcher_id = Watcher(), uuid.uuid4().hex
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    watcher.task = asyncio.create_task(_follow(call, watcher, request_path(rpc, request.path), request, started))
    try:
        await asyncio.wait_for(asyncio.shield(started), 30)
    except BaseException:
        watcher.task.cancel()
        raise
    _watchers[(call.metadata, call.sandbox, watcher_id)] = watcher
    return e2b.CreateWatcherResponse(watcher_id=watcher_id)


def _find(call: SandboxCall, watcher_id: str) -> tuple[tuple, Watcher]:
    _expire()
    key = (call.metadata, call.sandbox, watcher_id)
    if (watcher := _watchers.get(key)) is None:
        raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
    return key, watcher


async def get_watcher_events(request: e2b.GetWatcherEventsRequest, rpc: ConnectRequest, call: SandboxCall):
    key, watcher = _find(call, request.watcher_id)
    watcher.polled = time.monotonic()
    events, watcher.events = watcher.events, []
    if not events and watcher.failure is not None:
        _drop(key)
        raise watcher.failure
    return e2b.GetWatcherEventsResponse(events=events)


async def remove_watcher(request: e2b.RemoveWatcherRequest, rpc: ConnectRequest, call: SandboxCall):
    key, _ = _find(call, request.watcher_id)
    _drop(key)
    return e2b.RemoveWatcherResponse()
