"""Every service's /metrics endpoint (services/common/metrics.py): a real service bootstrap (serve) with a tiny
servicer, called over real gRPC, scraped over real HTTP at the address its etcd registration gives."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.errors import NotFound
from services.common.registry import ServiceDirectory
from services.common.server import serve
from services.common.settings import AuthSettings
from tests.inprocess import InProcessNode
from tests.prometheus_text import scrape

SERVICE = "test.v1.Probe"


def probe_handlers(context):
    context.metrics.gauge_callback(
        "microvm_test_things", "things by colour", ["colour"], lambda: {("red",): 2, ("blue",): 5}
    )

    async def ok(request, _context):
        return b"ok"

    async def missing(request, _context):
        raise NotFound("no such thing")

    async def aborts(request, grpc_context):
        await grpc_context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")

    async def crashes(request, _context):
        raise RuntimeError("a bug")

    async def streams(request, _context):
        for part in (b"a", b"b", b"c"):
            yield part

    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ok": unary(ok),
            "Missing": unary(missing),
            "Aborts": unary(aborts),
            "Crashes": unary(crashes),
            "Streams": grpc.unary_stream_rpc_method_handler(streams),
        },
    )


@pytest.fixture
async def probe_service(etcd_server, tmp_path):
    node = InProcessNode(etcd_server.endpoint, tmp_path)
    common = node.common()
    ready, stop = asyncio.Event(), asyncio.Event()
    seen = {}

    async def wiring(server, context):
        server.add_generic_rpc_handlers((probe_handlers(context),))
        seen["context"] = context
        return [SERVICE]

    settings = AuthSettings(listen="127.0.0.1:0")
    task = asyncio.create_task(serve("auth", common, settings, wiring, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 30)
    yield seen["context"]
    stop.set()
    await asyncio.wait_for(task, 30)


def call_labels(method: str, kind: str = "unary", code: str | None = None) -> tuple:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": kind}
    if code:
        labels["grpc_code"] = code
    return tuple(sorted(labels.items()))


async def test_calls_are_counted_by_method_and_the_status_the_caller_got(probe_service, etcd):
    directory = ServiceDirectory(etcd)
    await directory.open()
    try:
        [instance] = [i for i in directory.instances("auth") if i.instance_id == probe_service.instance_id]
    finally:
        await directory.close()
    metrics_address = instance.metadata["metrics"]
    assert metrics_address.startswith("127.0.0.1:") and not metrics_address.endswith(":0")

    async with grpc.aio.insecure_channel(instance.address) as channel:

        def method(name, stream=False):
            make = channel.unary_stream if stream else channel.unary_unary
            return make(f"/{SERVICE}/{name}")

        for _ in range(3):
            assert await method("Ok")(b"") == b"ok"
        assert [part async for part in method("Streams", stream=True)(b"")] == [b"a", b"b", b"c"]
        expected = {"Missing": grpc.StatusCode.NOT_FOUND, "Aborts": grpc.StatusCode.INVALID_ARGUMENT}
        expected["Crashes"] = grpc.StatusCode.INTERNAL  # the error mapping answers INTERNAL for a bug
        for name, code in expected.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await method(name)(b"")
            assert raised.value.code() == code

    samples = await asyncio.to_thread(scrape, metrics_address)
    assert samples[("grpc_server_started_total", call_labels("Ok"))] == 3
    assert samples[("grpc_server_handled_total", call_labels("Ok", code="OK"))] == 3
    assert samples[("grpc_server_handling_seconds_count", call_labels("Ok"))] == 3
    assert samples[("grpc_server_handled_total", call_labels("Streams", "server_stream", "OK"))] == 1
    for name, code in expected.items():
        assert samples[("grpc_server_handled_total", call_labels(name, code=code.name))] == 1, name
    assert samples[("microvm_test_things", (("colour", "red"),))] == 2
    assert samples[("microvm_test_things", (("colour", "blue"),))] == 5
    assert not any("sandbox" in dict(labels) for _, labels in samples), "no unbounded labels"
