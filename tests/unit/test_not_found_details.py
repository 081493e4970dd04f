"""NOT_FOUND says which thing is missing and what became of it (found by a new user: a missing command and a
missing sandbox were both a bare NOT_FOUND). A sandbox deleted or expired within a day is named as such, with
ErrorInfo metadata `ended` and `end_time`, to its own tenant only; a missing command has reason
COMMAND_NOT_FOUND. A whole installation (fake VMM)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return refused.value


def get(caller, name: str):
    return caller.stub.GetSandbox(api.GetSandboxRequest(name=f"sandboxes/{name}"), metadata=caller.metadata)


@pytest.fixture(scope="module")
async def tenants(installation):
    return [await tenant_caller(installation, f"gone-{uuid.uuid4().hex[:6]}") for _ in range(2)]


async def test_a_deleted_sandbox_says_it_was_deleted_to_its_tenant_only(tenants):
    owner, other = tenants
    created = await owner.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox_id="gone-soon"), metadata=owner.metadata, timeout=60
    )
    await owner.stub.DeleteSandbox(api.DeleteSandboxRequest(name=created.sandbox.name), metadata=owner.metadata)
    error = await refusal(lambda: get(owner, "gone-soon"))
    info = error_info(error)
    assert error.code() == grpc.StatusCode.NOT_FOUND and info.reason == "SANDBOX_NOT_FOUND"
    assert info.metadata["ended"] == "deleted" and info.metadata["end_time"], info
    assert "was deleted at" in error.details()
    run = api.ExecRequest(sandbox="sandboxes/gone-soon", process=api.ProcessConfig(argv=["true"]))
    ended = error_info(await refusal(lambda: owner.stub.Exec(run, metadata=owner.metadata))).metadata["ended"]
    assert ended == "deleted"

    # Another tenant asking for the same name learns nothing.
    foreign = await refusal(lambda: get(other, "gone-soon"))
    assert foreign.code() == grpc.StatusCode.NOT_FOUND and "ended" not in error_info(foreign).metadata
    assert foreign.details() == "sandbox gone-soon does not exist"


async def test_an_expired_sandbox_says_its_timeout_ran_out(tenants):
    owner, _ = tenants
    wanted = sandbox_pb2.Sandbox(timeout=duration_pb2.Duration(seconds=1))
    await owner.stub.CreateSandbox(
        api.CreateSandboxRequest(sandbox_id="short-lived", sandbox=wanted), metadata=owner.metadata, timeout=60
    )
    for _ in range(600):  # the reaper runs every second; a loaded host may take a while
        try:
            await owner.stub.GetSandbox(api.GetSandboxRequest(name="sandboxes/short-lived"), metadata=owner.metadata)
        except grpc.aio.AioRpcError as error:
            assert error_info(error).metadata["ended"] == "expired", error.details()
            assert "timeout ran out" in error.details()
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the sandbox did not expire")


async def test_a_missing_command_is_not_a_missing_sandbox(tenants):
    owner, _ = tenants
    created = await owner.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=owner.metadata, timeout=60)
    for argv in (["no-such-command-here"], ["/no/such/program"]):
        run = api.ExecRequest(sandbox=created.sandbox.name, process=api.ProcessConfig(argv=argv))
        error = await refusal(lambda run=run: owner.stub.Exec(run, metadata=owner.metadata))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(error).reason == "COMMAND_NOT_FOUND", (argv, error.details())
