"""The gateway's own metrics (services/gateway/metrics.py) on a whole installation (fake VMM: the real agent runs each
sandbox as a host process): exec streams open, bytes streamed by direction and kind, and creates by result and start
method, as Prometheus reads them."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller
from tests.prometheus_text import labels, scrape

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"gwm-{uuid.uuid4().hex[:6]}", max_sandboxes=2)


@pytest.fixture(scope="module")
async def sandbox(caller):
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    yield created.sandbox.name
    await caller.stub.DeleteSandbox(
        api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata, timeout=60
    )


async def samples(installation) -> dict:
    return await asyncio.to_thread(scrape, await installation.metrics_address("gateway"))


def streamed(samples: dict, direction: str, kind: str) -> float:
    return samples.get(("microvm_stream_bytes_total", labels(direction=direction, kind=kind)), 0)


async def test_output_input_and_file_bytes_are_counted_by_direction_and_kind(installation, caller, sandbox):
    before = await samples(installation)
    process = api.ProcessConfig(argv=["sh", "-c", "printf 12345; printf 123 >&2"])
    async for _ in caller.stub.Exec(api.ExecRequest(sandbox=sandbox, process=process), metadata=caller.metadata):
        pass

    def writes():
        yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=sandbox, path="/tmp/metrics-file"))
        yield api.WriteFileRequest(data=b"x" * 1000)
        yield api.WriteFileRequest(data=b"y" * 500)

    await caller.stub.WriteFile(writes(), metadata=caller.metadata, timeout=30)
    request = api.ReadFileRequest(sandbox=sandbox, path="/tmp/metrics-file")
    read = caller.stub.ReadFile(request, metadata=caller.metadata)
    assert sum([len(chunk.data) async for chunk in read]) == 1500
    after = await samples(installation)
    grown = {
        (direction, kind): streamed(after, direction, kind) - streamed(before, direction, kind)
        for direction, kind in (("to_client", "stdout"), ("to_client", "stderr"), ("to_sandbox", "file"))
    }
    assert grown == {("to_client", "stdout"): 5, ("to_client", "stderr"): 3, ("to_sandbox", "file"): 1500}
    assert streamed(after, "to_client", "file") - streamed(before, "to_client", "file") == 1500


async def test_an_interactive_exec_is_open_while_it_runs_and_its_stdin_is_counted(installation, caller, sandbox):
    key = ("microvm_exec_streams_open", labels(method="ExecInteractive"))
    before = await samples(installation)
    assert before[key] == 0
    stdin: asyncio.Queue = asyncio.Queue()

    async def requests():
        yield api.ExecInteractiveRequest(
            config=api.ExecInteractiveConfig(sandbox=sandbox, process=api.ProcessConfig(argv=["cat"]))
        )
        while (message := await stdin.get()) is not None:
            yield message

    call = caller.stub.ExecInteractive(requests(), metadata=caller.metadata, timeout=60)
    await stdin.put(api.ExecInteractiveRequest(stdin=b"hello"))
    echoed = b""
    async for response in call:
        echoed += response.event.stdout
        if echoed == b"hello":
            break
    during = await samples(installation)
    assert during[key] == 1
    assert streamed(during, "to_sandbox", "stdin") - streamed(before, "to_sandbox", "stdin") == 5
    await stdin.put(api.ExecInteractiveRequest(close_stdin=api.CloseStdin()))
    await stdin.put(None)
    async for response in call:
        if response.event.HasField("exited"):
            break
    assert await call.code() == grpc.StatusCode.OK
    for _ in range(100):  # the gateway's side of the stream ends right after the caller's
        if (after := await samples(installation))[key] == 0:
            break
        await asyncio.sleep(0.05)
    assert after[key] == 0


async def test_creates_are_counted_by_result_and_timed_by_start_method(installation, caller, sandbox):
    before = await samples(installation)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # the tenant's third sandbox: over its quota of 2
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=caller.metadata)
    after = await samples(installation)

    def grown(name: str, **pairs) -> float:
        return after.get((name, labels(**pairs)), 0) - before.get((name, labels(**pairs)), 0)

    methods = {
        dict(pairs)["method"]
        for (name, pairs), value in after.items()
        if name == "microvm_sandbox_creates_total" and dict(pairs)["result"] == "ok" and value
    }
    assert methods <= {"warm-pool", "template-snapshot", "cold-boot", "snapshot-restore"}, methods
    assert sum(grown("microvm_sandbox_creates_total", result="ok", method=m) for m in methods) == 1
    assert sum(grown("microvm_sandbox_create_seconds_count", method=m) for m in methods) == 1
    assert grown("microvm_sandbox_creates_total", result="resource_exhausted", method="none") == 1
