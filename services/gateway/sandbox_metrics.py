"""SandboxMetricsServicer: what a sandbox uses, from the compute of its node (services/compute/resource_sampler.py),
for the caller's own sandboxes only (another tenant's is NOT_FOUND, as a missing one)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import metrics_service_pb2 as metrics_api
from microvm.sandbox.v1 import metrics_service_pb2_grpc
from services.common.errors import InvalidArgument, NotFound, OutOfRange, ServiceError
from services.gateway.data_plane import DataPlane
from services.gateway.records import SandboxRecord, name_of
from services.gateway.sandbox_requests import parse_filter, parse_name
from services.gateway.sandboxes import LIVE

FOLLOW_POLL_SECONDS = 1.0  # how often a followed sandbox's node is asked for new samples
KEPT_SECONDS = 3600.0  # what each node keeps of a sandbox (services/compute/resource_sampler.py KEEP_SECONDS)


def seconds(stamp: Timestamp, field: str) -> float:
    try:
        return stamp.ToNanoseconds() / 1e9
    except ValueError as error:  # protobuf refuses nanos outside 0..999999999 and seconds outside its years
        raise InvalidArgument(f"{field}: {error}", reason="INVALID_TIMESTAMP") from None


def stamp(seconds_since_epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds_since_epoch))


def check_kept(start: float, end: float | None) -> None:
    """OUT_OF_RANGE, saying what is kept, for a range that cannot overlap it (all before the last hour, or after
    now); one that overlaps it gets the part that is kept."""
    now = time.time()
    kept_from = now - KEPT_SECONDS
    available = {"kept_from": stamp(kept_from), "kept_until": stamp(now)}
    if start > now + 1:
        raise OutOfRange(
            f"start_time {stamp(start)} is in the future: samples exist from {available['kept_from']} until now",
            reason="METRICS_RANGE_NOT_KEPT",
            metadata=available,
        )
    if end is not None and end < kept_from:
        raise OutOfRange(
            f"samples are kept for the last hour, from {available['kept_from']}: the range ending {stamp(end)} "
            "is older than that",
            reason="METRICS_RANGE_NOT_KEPT",
            metadata=available,
        )


class SandboxMetricsServicer(metrics_service_pb2_grpc.SandboxMetricsServiceServicer):
    def __init__(self, data: DataPlane) -> None:
        self.data = data

    async def _samples(self, record: SandboxRecord, after: float, latest_only: bool = False):
        """The VM's samples after `after`, or None when its node no longer has it."""
        if not record.node:
            return None
        request = compute_pb2.GetVmUsageRequest(vm_ids=[record.id], latest_only=latest_only)
        if after:
            request.after.FromNanoseconds(int(after * 1e9))
        answer = await self.data.nodes.on_compute(record.node, lambda stub: stub.GetVmUsage(request, timeout=10))
        return list(answer.vms[0].samples) if answer.vms else None

    async def GetSandboxMetrics(self, request, context):
        record = await self.data.sandboxes.store.get(parse_name(request.sandbox))
        start = seconds(request.start_time, "start_time") if request.HasField("start_time") else 0.0
        end = seconds(request.end_time, "end_time") if request.HasField("end_time") else None
        if request.follow and end is not None:
            raise InvalidArgument("follow goes on from now: give no end_time with it", reason="FOLLOW_WITH_END_TIME")
        if end is not None and end <= start:
            raise InvalidArgument("end_time must be after start_time", reason="EMPTY_TIME_RANGE")
        check_kept(start, end)
        # after = just before start: the compute answers samples strictly after it
        samples = await self._samples(record, max(0.0, start - 1e-6)) or []
        if end is not None:
            samples = [sample for sample in samples if seconds(sample.time, "sample.time") < end]
        yield metrics_api.GetSandboxMetricsResponse(samples=samples)
        if not request.follow:
            return
        last = seconds(samples[-1].time, "sample.time") if samples else max(start, time.time() - FOLLOW_POLL_SECONDS)
        while True:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            try:
                record = await self.data.sandboxes.store.get(record.name or record.id)
            except NotFound:
                return  # the sandbox ended: so does its stream
            if record.state not in LIVE:
                return
            fresh = await self._samples(record, last)
            if fresh is None:
                return
            for sample in fresh:
                last = seconds(sample.time, "sample.time")
                yield metrics_api.GetSandboxMetricsResponse(samples=[sample])

    async def ListSandboxMetrics(self, request, context):
        wanted = parse_filter(request.filter)
        records = [
            record
            for record in await self.data.sandboxes.store.list()
            if record.state in LIVE and record.node and all(record.labels.get(k) == v for k, v in wanted.items())
        ]
        by_node: dict[str, list[SandboxRecord]] = defaultdict(list)
        for record in records:
            by_node[record.node].append(record)

        async def newest_on(node: str, on_node: list[SandboxRecord]) -> list[metrics_api.SandboxUsage]:
            ask = compute_pb2.GetVmUsageRequest(vm_ids=[r.id for r in on_node], latest_only=True)
            try:
                answer = await self.data.nodes.on_compute(node, lambda stub: stub.GetVmUsage(ask, timeout=10))
            except (ServiceError, grpc.aio.AioRpcError):
                return []  # a lost node's sandboxes have no current use to show
            newest = {vm.vm_id: vm.samples[-1] for vm in answer.vms if vm.samples}
            return [
                metrics_api.SandboxUsage(sandbox=f"sandboxes/{name_of(r)}", template=r.template, sample=newest[r.id])
                for r in on_node
                if r.id in newest
            ]

        found = await asyncio.gather(*(newest_on(node, on_node) for node, on_node in by_node.items()))
        usage = sorted((entry for entries in found for entry in entries), key=lambda entry: entry.sandbox)
        return metrics_api.ListSandboxMetricsResponse(sandboxes=usage)
