"""What a sandbox uses (docs/observability.md): CPU, memory, disk and network, sampled every few seconds on its node
and kept for the last hour (SandboxMetricsService).

    usage = await sb.get_metrics()                 # the last hour, oldest first
    async for sample in sb.watch_metrics():        # the kept samples, then each new one
        print(sample.cpu_percent, sample.memory_bytes)
    for entry in await client.list_metrics():      # the newest sample of each of your sandboxes (`mvm top`)
        print(entry.sandbox, entry.usage.cpu_percent)
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import metrics_service_pb2 as metrics_api
from microvm.sandbox.v1 import metrics_service_pb2_grpc
from microvm.types.v1.resource_usage_pb2 import ResourceSample
from microvm_sandbox.errors import from_rpc_error

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient


@dataclass(frozen=True)
class ResourceUsage:
    """One sample. cpu_percent is of one host core (a busy 2-vCPU sandbox shows up to 200); memory_bytes is what its
    VM holds on the host (PSS) of memory_limit_bytes, guest_memory_used_bytes what the guest's kernel counts as used
    (0: its agent did not answer in time); network bytes are the guest's, since it started."""

    time: datetime.datetime
    cpu_percent: float
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int
    disk_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    vcpus: int
    guest_memory_used_bytes: int = 0
    guest_memory_total_bytes: int = 0

    @classmethod
    def of(cls, sample: ResourceSample) -> ResourceUsage:
        return cls(
            time=sample.time.ToDatetime(tzinfo=datetime.UTC),
            cpu_percent=sample.cpu_percent,
            cpu_seconds=sample.cpu_seconds,
            memory_bytes=sample.memory_bytes,
            memory_limit_bytes=sample.memory_limit_bytes,
            disk_bytes=sample.disk_bytes,
            network_rx_bytes=sample.network_rx_bytes,
            network_tx_bytes=sample.network_tx_bytes,
            vcpus=sample.vcpus,
            guest_memory_used_bytes=sample.guest_memory_used_bytes,
            guest_memory_total_bytes=sample.guest_memory_total_bytes,
        )


@dataclass(frozen=True)
class SandboxUsage:
    """The newest sample of one sandbox."""

    sandbox: str
    template: str
    usage: ResourceUsage


def metrics_stub(client: AsyncClient) -> Any:
    stub = getattr(client, "_metrics_stub", None)
    if stub is None:
        stub = metrics_service_pb2_grpc.SandboxMetricsServiceStub(client.channel)  # type: ignore[no-untyped-call]
        client._metrics_stub = stub  # type: ignore[attr-defined]
    return stub


def metrics_request(
    sandbox: str, start: datetime.datetime | None, end: datetime.datetime | None, follow: bool
) -> metrics_api.GetSandboxMetricsRequest:
    request = metrics_api.GetSandboxMetricsRequest(sandbox=sandbox, follow=follow)
    if start is not None:
        request.start_time.FromDatetime(start)
    if end is not None:
        request.end_time.FromDatetime(end)
    return request


async def stream_usage(
    client: AsyncClient, request: metrics_api.GetSandboxMetricsRequest, timeout: float | None
) -> AsyncIterator[ResourceUsage]:
    call = metrics_stub(client).GetSandboxMetrics(request, metadata=client.metadata, timeout=timeout)
    try:
        async for batch in call:
            for sample in batch.samples:
                yield ResourceUsage.of(sample)
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
    finally:
        call.cancel()


async def list_usage(client: AsyncClient, labels: dict[str, str] | None = None) -> list[SandboxUsage]:
    text = " ".join(f"labels.{key}={value}" for key, value in sorted((labels or {}).items()))
    reply = await client.call(
        "ListSandboxMetrics",
        metrics_api.ListSandboxMetricsRequest(filter=text),
        idempotent=True,
        stub=metrics_stub(client),
    )
    return [SandboxUsage(e.sandbox, e.template, ResourceUsage.of(e.sample)) for e in reply.sandboxes]


class AsyncMetricsMethods:
    """`AsyncSandbox`'s resource use (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    async def get_metrics(
        self, start: datetime.datetime | None = None, end: datetime.datetime | None = None
    ) -> list[ResourceUsage]:
        """The samples taken from `start` (default: an hour ago, all that are kept) until `end` (default: now)."""
        request = metrics_request(self.name, start, end, follow=False)
        return [usage async for usage in stream_usage(self.client, request, self.client.timeout)]

    def watch_metrics(self, start: datetime.datetime | None = None) -> AsyncIterator[ResourceUsage]:
        """The kept samples from `start`, then each new one as it is taken, until the sandbox ends."""
        return stream_usage(self.client, metrics_request(self.name, start, None, follow=True), None)
