"""What a sandbox uses (SandboxMetricsService; samples taken by services/compute/resource_sampler.py): a whole
installation with the fake VMM, whose "VMs" are real host processes with real /proc figures, sampling every 0.2 s.
A tenant sees only its own sandboxes."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from microvm.sandbox.v1 import metrics_service_pb2 as metrics_api
from microvm.sandbox.v1 import metrics_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1.resource_usage_pb2 import ResourceSample
from services.compute.resource_sampler import USAGE_FILE, ResourceSampler
from tests.inprocess import InProcessNode, fake_image_root, start_installation, tenant_caller

SAMPLE_SECONDS = 0.2


@pytest.fixture(scope="module")
async def sampled(etcd_server):
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-usage-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "usage_sample_seconds": SAMPLE_SECONDS}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


async def tenant(node):
    caller = await tenant_caller(node, f"usage-{uuid.uuid4().hex[:6]}")
    return caller, metrics_service_pb2_grpc.SandboxMetricsServiceStub(caller.channel)


async def samples_of(stub, caller, name: str, **fields) -> list[ResourceSample]:
    request = metrics_api.GetSandboxMetricsRequest(sandbox=name, **fields)
    return [
        sample async for batch in stub.GetSandboxMetrics(request, metadata=caller.metadata) for sample in batch.samples
    ]


async def until_samples(stub, caller, name: str, count: int) -> list[ResourceSample]:
    for _ in range(300):
        samples = await samples_of(stub, caller, name)
        if len(samples) >= count:
            return samples
        await asyncio.sleep(SAMPLE_SECONDS)
    raise AssertionError(f"fewer than {count} samples of {name}: {samples}")


async def test_samples_describe_the_sandboxes_vmm_and_follow_streams_new_ones(sampled):
    caller, stub = await tenant(sampled)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    name = created.sandbox.name
    samples = await until_samples(stub, caller, name, 3)
    times = [sample.time.ToNanoseconds() for sample in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    newest = samples[-1]
    assert newest.memory_bytes > 0 and newest.memory_limit_bytes == created.sandbox.memory_mib << 20
    assert newest.cpu_seconds > 0 and newest.cpu_percent >= 0 and newest.vcpus == created.sandbox.vcpus
    # The guest's own view, from its agent (the fake VMM's guest is a host process: it reports the host's memory).
    assert 0 < newest.guest_memory_used_bytes < newest.guest_memory_total_bytes

    # A range: only what was taken inside it.
    middle = samples[1].time
    later = await samples_of(stub, caller, name, start_time=middle)
    assert later and all(s.time.ToNanoseconds() >= middle.ToNanoseconds() for s in later)
    before = await samples_of(stub, caller, name, end_time=middle)
    assert before and all(s.time.ToNanoseconds() < middle.ToNanoseconds() for s in before)

    # Follow: the kept samples, then new ones as they are taken, until the sandbox is deleted.
    followed = stub.GetSandboxMetrics(
        metrics_api.GetSandboxMetricsRequest(sandbox=name, follow=True), metadata=caller.metadata
    )
    first = await followed.read()
    assert len(first.samples) >= 3
    fresh = await followed.read()
    assert fresh.samples[0].time.ToNanoseconds() > first.samples[-1].time.ToNanoseconds()
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=caller.metadata, timeout=60)
    while (message := await followed.read()) is not grpc.aio.EOF:  # it ends by itself once the sandbox is gone
        assert len(message.samples) == 1
    assert await followed.code() == grpc.StatusCode.OK


async def test_list_shows_the_newest_sample_of_each_of_the_callers_sandboxes_only(sampled):
    (mine, my_stub), (theirs, _) = await tenant(sampled), await tenant(sampled)
    labelled = api.CreateSandboxRequest()
    labelled.sandbox.labels["team"] = "blue"
    names = []
    for request in (labelled, api.CreateSandboxRequest()):
        created = await mine.stub.CreateSandbox(request, metadata=mine.metadata, timeout=60)
        names.append(created.sandbox.name)
    other = await theirs.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=theirs.metadata, timeout=60)
    for name in names:
        await until_samples(my_stub, mine, name, 1)

    listed = await my_stub.ListSandboxMetrics(metrics_api.ListSandboxMetricsRequest(), metadata=mine.metadata)
    assert sorted(entry.sandbox for entry in listed.sandboxes) == sorted(names)
    assert all(entry.template == "default" and entry.sample.memory_bytes > 0 for entry in listed.sandboxes)
    filtered = await my_stub.ListSandboxMetrics(
        metrics_api.ListSandboxMetricsRequest(filter="labels.team=blue"), metadata=mine.metadata
    )
    assert [entry.sandbox for entry in filtered.sandboxes] == names[:1]

    # Another tenant's sandbox is as missing as one that never was.
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await samples_of(my_stub, mine, other.sandbox.name)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await samples_of(my_stub, mine, "sandboxes/never-was")
    assert foreign.value.code() == missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_ranges_are_refused_with_what_is_wrong(sampled):
    caller, stub = await tenant(sampled)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    now = created.sandbox.create_time
    cases = {
        "follow goes on from now": dict(follow=True, end_time=now),
        "end_time must be after start_time": dict(start_time=now, end_time=now),
        "start_time: Timestamp is not valid": dict(start_time=Timestamp(seconds=0, nanos=2147483647)),
        "end_time: Timestamp is not valid": dict(end_time=Timestamp(seconds=-(1 << 40))),
    }
    for message, fields in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await samples_of(stub, caller, created.sandbox.name, **fields)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()
    hour_and_more_ago, tomorrow = Timestamp(), Timestamp()
    hour_and_more_ago.FromSeconds(int(time.time()) - 3700)
    tomorrow.FromSeconds(int(time.time()) + 86400)
    for fields in (dict(end_time=hour_and_more_ago), dict(start_time=tomorrow)):
        with pytest.raises(grpc.aio.AioRpcError) as outside:
            await samples_of(stub, caller, created.sandbox.name, **fields)
        assert outside.value.code() == grpc.StatusCode.OUT_OF_RANGE, fields
        assert "samples" in outside.value.details(), outside.value.details()  # it says what there is
    with pytest.raises(grpc.aio.AioRpcError) as bad_name:
        await samples_of(stub, caller, "not-a-name")
    assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_last_hour_survives_a_compute_restart_and_older_samples_are_dropped(tmp_path):
    # The samples are in the VM's directory: a new sampler (a restarted compute) finds them.
    from types import SimpleNamespace

    from microvm.types.v1 import vm_pb2

    vm = vm_pb2.VmRecord(id="vm-1", directory=str(tmp_path), state=vm_pb2.VM_STATE_RUNNING)
    ledger = SimpleNamespace(vms={"vm-1": vm})
    first = ResourceSampler(ledger, 1.0)
    for age in (7200, 30, 20, 10):  # seconds ago: the first is older than an hour
        sample = ResourceSample(memory_bytes=age)
        sample.time.FromNanoseconds(int((time.time() - age) * 1e9))
        first.keep(vm, sample)
    with open(tmp_path / USAGE_FILE, "ab") as torn:
        torn.write(b"\x7f\x01")  # a record cut by a crash
    again = ResourceSampler(ledger, 1.0)
    assert [s.memory_bytes for s in again.usage("vm-1")] == [30, 20, 10]
    assert again.usage("not-here") is None


async def test_the_sdk_reads_samples_follows_them_and_lists_the_newest(sampled):
    from microvm_sandbox import AsyncSandbox, Client, ResourceUsage, Sandbox
    from microvm_sandbox.aio import AsyncClient
    from microvm_sandbox.errors import InvalidArgumentError

    caller, stub = await tenant(sampled)
    client = AsyncClient(await sampled.address("gateway"), caller.key)
    sandbox = await AsyncSandbox.create(client=client, labels={"sdk": "yes"})
    try:
        await until_samples(stub, caller, sandbox.name, 2)
        usage = await sandbox.get_metrics()
        assert len(usage) >= 2 and all(isinstance(u, ResourceUsage) for u in usage)
        assert usage[-1].memory_bytes > 0 and usage[-1].time.tzinfo is not None
        watched = []
        async for sample in sandbox.watch_metrics(start=usage[-1].time):
            watched.append(sample)
            if len(watched) == 3:
                break
        assert [s.time for s in watched] == sorted(s.time for s in watched) and watched[-1].time > usage[-1].time
        [listed] = await client.list_metrics(labels={"sdk": "yes"})
        assert listed.sandbox == sandbox.name and listed.template == "default"
        with pytest.raises(InvalidArgumentError, match="end_time must be after"):
            await sandbox.get_metrics(start=usage[-1].time, end=usage[0].time)

        def synchronously() -> tuple[int, int]:
            sync_client = Client(client.address, caller.key)
            same = Sandbox.connect(sandbox.id, client=sync_client)
            followed = same.watch_metrics()
            first = next(followed)
            followed.close()
            return len(same.get_metrics()), len(sync_client.list_metrics(labels={"sdk": "yes"})) + (first.vcpus > 0)

        kept, listed_and_valid = await asyncio.to_thread(synchronously)
        assert kept >= 2 and listed_and_valid == 2
    finally:
        await sandbox.kill()
        await client.close()


async def test_mvm_metrics_and_top(sampled):
    from microvm_sandbox import AsyncSandbox
    from microvm_sandbox.aio import AsyncClient
    from mvm_cli.main import parse
    from tests.unit.test_cli_code import mvm

    assert parse(["top", "--sort", "memory", "--once"]).sort == "memory"
    with pytest.raises(SystemExit):
        parse(["top", "--sort", "colour"])
    caller, stub = await tenant(sampled)
    client = AsyncClient(await sampled.address("gateway"), caller.key)
    sandbox = await AsyncSandbox.create(client=client)
    sandbox.gateway, sandbox.key = client.address, caller.key
    try:
        await until_samples(stub, caller, sandbox.name, 2)
        status, out, err = await mvm(sandbox, "metrics", sandbox.id)
        assert status == 0, err
        header, *rows = out.splitlines()
        assert header.split()[:3] == ["TIME", "CPU%", "MEMORY"] and len(rows) >= 2
        status, out, err = await mvm(sandbox, "metrics", sandbox.id, "--json")
        assert status == 0 and all(json.loads(line)["memory_bytes"] > 0 for line in out.splitlines())
        status, out, err = await mvm(sandbox, "top", "--once", "--sort", "memory")
        assert status == 0, err
        assert out.splitlines()[0].startswith("SANDBOX") and sandbox.id in out
        status, out, err = await mvm(sandbox, "metrics", "sbx-never-was")
        assert status != 0 and "not" in err.lower()
    finally:
        await sandbox.kill()
        await client.close()


async def test_http_serves_the_samples_as_ndjson_and_the_list_as_json(sampled):
    import aiohttp

    caller, stub = await tenant(sampled)
    created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    await until_samples(stub, caller, created.sandbox.name, 2)
    base = f"http://{sampled.settings['gateway']['http_listen']}/v1"
    headers = {"Authorization": f"Bearer {caller.key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{base}/{created.sandbox.name}/metrics") as response:
            assert response.status == 200, await response.text()
            lines = [json.loads(line) for line in (await response.text()).splitlines() if line.strip()]
        samples = [sample for line in lines for sample in line["samples"]]  # one JSON message a line
        assert len(samples) >= 2 and int(samples[-1]["memoryBytes"]) > 0
        async with session.get(f"{base}/sandboxes:metrics") as response:
            listed = await response.json()
        assert [entry["sandbox"] for entry in listed["sandboxes"]] == [created.sandbox.name]
        async with session.get(f"{base}/sandboxes/never-was/metrics") as response:
            assert response.status == 404


async def test_a_quiet_guest_is_not_woken_for_its_memory_view_more_than_once_a_minute(tmp_path, monkeypatch):
    """The guest's memory view costs a ping (guest CPU under TCG): a guest that stayed quiet keeps its last one."""
    from types import SimpleNamespace

    from microvm.types.v1 import vm_pb2
    from services.compute import resource_sampler

    vm = vm_pb2.VmRecord(id="vm-1", directory=str(tmp_path), state=vm_pb2.VM_STATE_RUNNING)
    pings = []

    async def facts(vm_id, timeout):
        pings.append(vm_id)
        return SimpleNamespace(mem_total_kib=1000, mem_available_kib=1000 - 100 * len(pings))

    sampler = ResourceSampler(SimpleNamespace(vms={"vm-1": vm}), 5.0, guests=SimpleNamespace(facts=facts))
    clock = [1000.0]
    monkeypatch.setattr(resource_sampler.time, "monotonic", lambda: clock[0])

    async def sample(cpu_percent: float) -> ResourceSample:
        taken = ResourceSample(cpu_percent=cpu_percent)
        await sampler._add_guest_view(vm, taken)
        return taken

    assert (await sample(0.0)).guest_memory_used_bytes == 100 << 10  # the first: asked
    clock[0] += 5
    assert (await sample(0.2)).guest_memory_used_bytes == 100 << 10 and len(pings) == 1  # quiet: kept
    clock[0] += 5
    assert (await sample(30.0)).guest_memory_used_bytes == 200 << 10 and len(pings) == 2  # busy: asked
    clock[0] += resource_sampler.GUEST_VIEW_MAX_AGE
    assert (await sample(0.0)).guest_memory_used_bytes == 300 << 10 and len(pings) == 3  # quiet but old: asked
