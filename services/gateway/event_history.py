"""The cluster's history as etcd keeps it: a key range read as it was at a past revision, and a watch of a key range
from a revision on, one etcd watch response at a time.

aetcd offers neither (its reads are at the newest revision; its watches hand over single events without the
response they came in), so both speak etcd's own API on the client's channel. A watch response holds every change
of each revision it covers (etcd splits responses only between revisions, unless asked for fragments, which we
never are), so the changes of one transaction (a sandbox record deleted with its tombstone written) arrive together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from aetcd import rpc

from services.common import deadlines
from services.common.errors import Unavailable

PUT = 0  # mvccpb.Event.EventType
# Responses a watch holds for a consumer that does not keep up (a slow stream reader, a webhook retrying): past this it
# ends UNAVAILABLE instead of holding the cluster's changes in memory without bound; the consumer resumes from its
# last cursor.
MAX_BACKLOG = 10_000


class Compacted(Exception):
    """The revision asked for is older than what etcd still keeps (compaction)."""

    def __init__(self, revision: int, compacted: int = 0) -> None:
        super().__init__(f"revision {revision} is compacted (etcd keeps history from {compacted or 'later'})")
        self.revision, self.compacted = revision, compacted


class FutureRevision(Exception):
    """The revision asked for is newer than the cluster's."""


@dataclass(frozen=True)
class Change:
    """One key changed at `revision`: `value` None when it was deleted; `created` when the put made the key."""

    revision: int
    key: bytes
    value: bytes | None
    created: bool


@dataclass(frozen=True)
class Batch:
    """One watch response: its changes (whole revisions, oldest first), or none for a progress notification, after
    which every change up to `revision` has been delivered."""

    revision: int
    changes: tuple[Change, ...]

    def revisions(self) -> Iterator[tuple[int, list[Change]]]:
        """The changes grouped by revision, oldest first."""
        group: list[Change] = []
        for change in self.changes:
            if group and change.revision != group[0].revision:
                yield group[0].revision, group
                group = []
            group.append(change)
        if group:
            yield group[0].revision, group


def _rpc_failure(error: grpc.aio.AioRpcError, revision: int) -> Exception:
    details = error.details() or ""
    if error.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(revision)
    if error.code() == grpc.StatusCode.OUT_OF_RANGE and "future" in details:
        return FutureRevision(f"revision {revision} is newer than the cluster's")
    return error


class EtcdHistory:
    def __init__(self, etcd) -> None:
        self.etcd = etcd

    async def head(self) -> int:
        """The cluster's current revision."""
        await self.etcd.connect()
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        response = await self.etcd.kvstub.Range(request, timeout=deadlines.QUICK, metadata=self.etcd.metadata)
        return response.header.revision

    async def read(self, start: bytes, end: bytes, revision: int) -> list:
        """Every key in [start, end) as it was at `revision` (etcd KeyValue messages). Compacted when etcd no longer
        keeps that revision."""
        await self.etcd.connect()
        request = rpc.RangeRequest(key=start, range_end=end, revision=revision)
        try:
            response = await self.etcd.kvstub.Range(request, timeout=deadlines.QUICK, metadata=self.etcd.metadata)
        except grpc.aio.AioRpcError as error:
            raise _rpc_failure(error, revision) from None
        return list(response.kvs)

    async def watch(self, start: bytes, end: bytes, after: int) -> EtcdWatch:
        """A watch of [start, end) delivering every change after revision `after`, in place when this returns."""
        watch = EtcdWatch(self.etcd, start, end, after)
        await watch.open()
        return watch


class EtcdWatch:
    """One etcd watch on a stream of its own; `next()` hands over its responses as Batches."""

    def __init__(self, etcd, start: bytes, end: bytes, after: int) -> None:
        self.etcd, self.start, self.end, self.after = etcd, start, end, after
        self._call = None
        self._batches: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        await self.etcd.connect()
        self._call = rpc.WatchStub(self.etcd.channel).Watch(metadata=self.etcd.metadata)
        create = rpc.WatchCreateRequest(
            key=self.start, range_end=self.end, start_revision=self.after + 1, progress_notify=True
        )
        try:
            await self._call.write(rpc.WatchRequest(create_request=create))
            first = await asyncio.wait_for(self._call.read(), deadlines.QUICK)
        except grpc.aio.AioRpcError as error:
            self._call.cancel()
            raise _rpc_failure(error, self.after + 1) from None
        except BaseException:
            self._call.cancel()
            raise
        if first is grpc.aio.EOF or not first.created:
            self._call.cancel()
            raise Unavailable("etcd ended the watch as it was being made", reason="ETCD_UNAVAILABLE")
        if first.compact_revision or first.canceled:
            self._call.cancel()
            raise Compacted(self.after + 1, first.compact_revision)
        self._reader = asyncio.create_task(self._read(), name="etcd-history-watch")

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise Unavailable("etcd ended the watch", reason="ETCD_UNAVAILABLE")
                if response.compact_revision:
                    raise Compacted(self.after + 1, response.compact_revision)
                if response.canceled:
                    raise Unavailable(f"etcd cancelled the watch: {response.cancel_reason}", reason="ETCD_UNAVAILABLE")
                changes = tuple(
                    Change(
                        event.kv.mod_revision,
                        event.kv.key,
                        event.kv.value if event.type == PUT else None,
                        event.type == PUT and event.kv.create_revision == event.kv.mod_revision,
                    )
                    for event in response.events
                )
                revision = changes[-1].revision if changes else response.header.revision
                if self._batches.qsize() >= MAX_BACKLOG:
                    raise Unavailable(
                        "this watch fell behind the cluster's changes; resume from the last cursor",
                        reason="WATCH_FELL_BEHIND",
                    )
                self._batches.put_nowait(Batch(revision, changes))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            self._batches.put_nowait(
                error
                if error.code() != grpc.StatusCode.UNAVAILABLE
                else Unavailable(f"etcd is unreachable: {error.details()}", reason="ETCD_UNAVAILABLE")
            )
        except Exception as error:
            self._batches.put_nowait(error)

    async def next(self, timeout: float | None = None) -> Batch | None:
        """The next response; None when `timeout` seconds passed without one. Raises what ended the watch."""
        try:
            async with asyncio.timeout(timeout):
                item = await self._batches.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            self._batches.put_nowait(item)  # every later call says the same
            raise item
        return item

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)  # a cancellation of our own still propagates
