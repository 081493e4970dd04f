"""GuestWatches: WatchDir on a guest's agent channel.

The agent sends changes within the credit this stream grants, which goes back only as gRPC takes each change: a
slow caller makes the guest drop changes (and say `overflow`), never the relay buffer them. A quiet watch sends a
keepalive every KEEPALIVE_SECONDS; cancelling the call cancels the guest's watch.
"""

from __future__ import annotations

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.validation import check_path
from services.relay.guest_io import failure, sandbox_id

KEEPALIVE_SECONDS = 10.0
EVENT_TYPE = {
    agent_pb2.WATCH_EVENT_TYPE_CREATE: api.FILE_EVENT_TYPE_CREATE,
    agent_pb2.WATCH_EVENT_TYPE_WRITE: api.FILE_EVENT_TYPE_WRITE,
    agent_pb2.WATCH_EVENT_TYPE_REMOVE: api.FILE_EVENT_TYPE_REMOVE,
    agent_pb2.WATCH_EVENT_TYPE_RENAME: api.FILE_EVENT_TYPE_RENAME,
    agent_pb2.WATCH_EVENT_TYPE_CHMOD: api.FILE_EVENT_TYPE_CHMOD,
}


def responses_of(batch: agent_pb2.WatchEvents, first: bool):
    if first:
        yield api.WatchDirResponse(started=api.WatchStarted(directories=batch.started_directories))
    if batch.overflow:
        yield api.WatchDirResponse(overflow=api.WatchOverflow())
    for event in batch.events:
        yield api.WatchDirResponse(
            change=api.FileEvent(
                type=EVENT_TYPE.get(event.type, api.FILE_EVENT_TYPE_UNSPECIFIED),
                path=event.path,
                previous_path=event.previous_path,
                directory=event.directory,
            )
        )


class GuestWatches:
    def __init__(self, open_stream) -> None:
        self.open_stream = open_stream

    async def watch(self, request: api.WatchDirRequest):
        check_path(request.path)
        stream = await self.open_stream(sandbox_id(request.sandbox))
        finished, first = False, True
        try:
            await stream.send(watch_start=agent_pb2.WatchStart(path=request.path, recursive=request.recursive))
            while True:
                try:
                    frame = await stream.receive(timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield api.WatchDirResponse(keepalive=api.Keepalive())
                    continue
                kind = frame.WhichOneof("body")
                if kind == "error":
                    finished = True
                    raise failure(frame)
                if kind != "watch_events":
                    continue
                batch = frame.watch_events
                for response in responses_of(batch, first):
                    yield response
                first = False
                await stream.grant(batch.ByteSize())
                if batch.ended:
                    finished = True
                    return
        finally:
            await stream.close(cancel=not finished)
