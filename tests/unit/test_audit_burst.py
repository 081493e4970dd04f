"""The audit trail under a burst: every mutating call that returns to its caller has exactly one entry in its
tenant's audit log, written before the call's status was sent, and the chain verifies. A call whose entry cannot be
recorded fails (UNAVAILABLE, AUDIT_UNAVAILABLE) instead of succeeding unrecorded; a caller that hangs up still gets
its entry. A whole installation (fake VMM) in this event loop."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.auth.audit import AuditLog
from services.common.errors import Unavailable, error_info
from tests.inprocess import InProcessNode, fake_image_root, start_installation, tenant_caller

pytestmark = pytest.mark.timeout(300)
CALLS = 1000
SANDBOXES = 4
UPDATE = "/microvm.sandbox.v1.SandboxService/UpdateSandbox"
DELETE = "/microvm.sandbox.v1.SandboxService/DeleteSandbox"


@pytest.fixture(scope="module")
async def installation(etcd_server):
    """As the shared one, with a rate limit no burst of this module reaches: a call refused at the door
    (RESOURCE_EXHAUSTED before it runs) is not audited, and this module counts audited calls."""
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-audit-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    node.settings["gateway"] = {"rate_limit_per_second": 10_000.0, "rate_limit_burst": 10_000.0}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


async def audit_log(installation, tenant: str) -> auth_pb2.ListAuditEventsResponse:
    auth = auth_pb2_grpc.AuthServiceStub(installation.channel(await installation.address("auth")))
    return await auth.ListAuditEvents(auth_pb2.ListAuditEventsRequest(tenant=tenant), timeout=30)


async def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def update(name: str, value: str) -> api.UpdateSandboxRequest:
    return api.UpdateSandboxRequest(
        sandbox=sandbox_pb2.Sandbox(name=name, labels={"call": value}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
    )


async def test_every_call_of_a_burst_of_a_thousand_returns_with_its_audit_entry(installation):
    tenant = f"burst-{installation.node}"
    caller = await tenant_caller(installation, tenant)
    names = [
        (await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)).sandbox.name
        for _ in range(SANDBOXES)
    ]
    before = len((await audit_log(installation, tenant)).events)

    # Half change a label of one of a few sandboxes (OK, or ABORTED when the sandbox changes too fast), half delete a
    # sandbox that does not exist (NOT_FOUND): each of those has a target of its own, so its entry is its alone.
    calls: list[tuple[str, str, api.UpdateSandboxRequest | api.DeleteSandboxRequest]] = []
    for index in range(CALLS):
        if index % 2:
            calls.append(
                (DELETE, f"sandboxes/gone-{index:04d}", api.DeleteSandboxRequest(name=f"sandboxes/gone-{index:04d}"))
            )
        else:
            name = names[index // 2 % SANDBOXES]
            calls.append((UPDATE, name, update(name, str(index))))

    async def one(method: str, request) -> grpc.StatusCode:
        rpc = caller.stub.UpdateSandbox if method == UPDATE else caller.stub.DeleteSandbox
        return await status_of(lambda: rpc(request, metadata=caller.metadata, timeout=120))

    started = time.monotonic()
    statuses = await asyncio.gather(*(one(method, request) for method, _, request in calls))
    wall = time.monotonic() - started
    # Read at once: an entry written after its call returned is exactly the failure this test exists for.
    log = await audit_log(installation, tenant)

    returned = Counter(
        (method, target, status.name) for (method, target, _), status in zip(calls, statuses, strict=True)
    )
    recorded = Counter((e.method, e.target, e.result) for e in log.events[before:])
    print(
        f"\naudit burst: {CALLS} calls ({Counter(s.name for s in statuses)}), "
        f"{len(log.events) - before} entries, {wall:.2f}s wall"
    )
    assert log.chain_valid
    assert [e.sequence for e in log.events] == list(range(1, len(log.events) + 1))
    assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND}
    assert grpc.StatusCode.OK in statuses
    assert recorded == returned


async def test_a_call_whose_audit_entry_cannot_be_recorded_fails(installation, monkeypatch):
    tenant = f"unrecorded-{installation.node}"
    caller = await tenant_caller(installation, tenant)
    sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox

    async def unavailable(self, event):
        raise Unavailable("etcd is away", reason="ETCD_UNAVAILABLE")

    monkeypatch.setattr(AuditLog, "append", unavailable)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await caller.stub.UpdateSandbox(update(sandbox.name, "unrecorded"), metadata=caller.metadata, timeout=60)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(failed.value).reason == "AUDIT_UNAVAILABLE"

    # A stream: every message arrives (the process ran and exited), but the call does not end OK unrecorded.
    stream = caller.stub.Exec(
        api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["true"])),
        metadata=caller.metadata,
        timeout=60,
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stream:
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(failed.value).reason == "AUDIT_UNAVAILABLE"

    monkeypatch.undo()
    got = await caller.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), metadata=caller.metadata, timeout=30)
    # The change had happened when its entry failed: the failure says so, and the caller checks before retrying.
    assert got.sandbox.labels["call"] == "unrecorded"
    log = await audit_log(installation, tenant)
    assert [e.method.rsplit("/", 1)[1] for e in log.events] == ["CreateSandbox"] and log.chain_valid


async def test_a_caller_that_hangs_up_still_gets_its_audit_entry(installation, monkeypatch):
    tenant = f"hangup-{installation.node}"
    caller = await tenant_caller(installation, tenant)
    sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox
    entered, gate, written = asyncio.Event(), asyncio.Event(), asyncio.Event()
    append = AuditLog.append

    async def held(self, event):
        entered.set()
        await gate.wait()
        try:
            return await append(self, event)
        finally:
            written.set()

    monkeypatch.setattr(AuditLog, "append", held)
    call = caller.stub.UpdateSandbox(update(sandbox.name, "hung-up"), metadata=caller.metadata, timeout=60)
    await asyncio.wait_for(entered.wait(), 30)
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    gate.set()
    await asyncio.wait_for(written.wait(), 30)
    monkeypatch.undo()

    log = await audit_log(installation, tenant)
    assert [(e.method, e.target, e.result) for e in log.events[1:]] == [(UPDATE, sandbox.name, "OK")]
    assert log.chain_valid


async def test_a_process_stream_hung_up_after_its_exit_is_recorded_ok_and_its_status_waits_for_the_entry(
    installation, monkeypatch
):
    tenant = f"exited-{installation.node}"
    caller = await tenant_caller(installation, tenant)
    sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox
    entered, gate = asyncio.Event(), asyncio.Event()
    append = AuditLog.append

    async def held(self, event):
        entered.set()
        await gate.wait()
        return await append(self, event)

    monkeypatch.setattr(AuditLog, "append", held)

    async def run(hang_up: bool) -> grpc.StatusCode | None:
        entered.clear()
        gate.clear()
        call = caller.stub.Exec(
            api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["true"])),
            metadata=caller.metadata,
            timeout=60,
        )
        async for event in call:
            if event.HasField("exited"):
                break
        await asyncio.wait_for(entered.wait(), 30)  # the entry is being written: the stream has not ended
        if hang_up:
            call.cancel()
            gate.set()
            return None
        ending = asyncio.ensure_future(call.code())
        await asyncio.sleep(0.2)
        assert not ending.done()  # its status waits for the entry
        gate.set()
        return await ending

    assert await run(hang_up=False) == grpc.StatusCode.OK
    await run(hang_up=True)
    for _ in range(300):
        log = await audit_log(installation, tenant)
        if len(log.events) == 3:
            break
        await asyncio.sleep(0.1)
    monkeypatch.undo()
    exec_method = "/microvm.sandbox.v1.SandboxService/Exec"
    assert [(e.method, e.target, e.result) for e in log.events[1:]] == [(exec_method, sandbox.name, "OK")] * 2
    assert log.chain_valid
