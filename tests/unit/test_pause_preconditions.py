"""Pause and resume of a sandbox whose VM is neither running nor paused: FAILED_PRECONDITION, with a reason that
says which of the two the call needed, and the sandbox named (services/gateway/sandboxes.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


async def failed_sandbox(caller) -> sandbox_pb2.Sandbox:
    """A sandbox whose guest died: the fake VMM's guest is its agent, the exec's parent."""
    sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in caller.stub.Exec(
            api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["sh", "-c", "kill -9 $PPID"])),
            metadata=caller.metadata,
            timeout=30,
        ):
            pass
    for _ in range(600):
        got = (await caller.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), metadata=caller.metadata)).sandbox
        if got.state == sandbox_pb2.SANDBOX_STATE_FAILED:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("the sandbox never read FAILED")


async def test_pause_and_resume_of_a_failed_sandbox_say_what_they_needed(installation):
    caller = await tenant_caller(installation, f"pause-{installation.node}")
    sandbox = await failed_sandbox(caller)
    calls = (
        ("PauseSandbox", api.PauseSandboxRequest(name=sandbox.name), "SANDBOX_NOT_RUNNING"),
        ("ResumeSandbox", api.ResumeSandboxRequest(name=sandbox.name), "SANDBOX_NOT_PAUSED"),
    )
    for method, request, reason in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(caller.stub, method)(request, metadata=caller.metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
        info = error_info(refused.value)
        assert info.reason == reason and info.metadata["sandbox"] == sandbox.name, (method, info)
        assert "FAILED" in refused.value.details()
    still = (await caller.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), metadata=caller.metadata)).sandbox
    assert still.state == sandbox_pb2.SANDBOX_STATE_FAILED  # refused calls changed nothing
