"""A pooled VM claimed by a create carries on under a new id: the relay keeps its agent channel (renamed) instead
of closing it with the pool's record and connecting again on the create's path (services/relay/server.py forget)."""

from __future__ import annotations

import asyncio

import pytest

from microvm.relay.v1 import relay_pb2
from microvm.types.v1 import vm_pb2
from services.common.records import VMS, Records
from services.common.settings import RelaySettings
from services.relay.vms import target_of
from tests.unit.test_relay_with_host_agent import add_vm, serve_relay, start_agent

pytestmark = pytest.mark.timeout(60)


async def until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the relay never saw the change")


@pytest.fixture
async def pooled(tmp_path, etcd, node_name):
    """A relay and a "pool VM" whose agent it has already reached (as the pool's warm-up does)."""
    socket_path = str(tmp_path / "agent.sock")
    (tmp_path / "root").mkdir()
    agent = await start_agent(socket_path, "--root", str(tmp_path / "root"), "--hostname", "pooled")
    await add_vm(etcd, node_name, "pool-1", socket_path)
    async with serve_relay(etcd, node_name, RelaySettings(connect_timeout_seconds=3), tmp_path) as stub:
        await stub.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="pool-1", timeout_ms=5000))
        stub.socket_path = socket_path
        yield stub
    agent.kill()
    agent.wait()


def channel_of(stub, vm_id: str):
    return stub.relay.pool.live(target_of(stub.relay.vms.vms[vm_id]))


async def test_a_claimed_pool_vm_keeps_its_channel_under_its_new_id(pooled):
    before = channel_of(pooled, "pool-1")
    assert before is not None
    # As compute's claim does: the new record first, then the pool's removed.
    await add_vm(pooled.etcd, pooled.node, "sbx-claimed", pooled.socket_path)
    await Records(pooled.etcd).delete(VMS, pooled.node, "pool-1")
    await until(lambda: "pool-1" not in pooled.relay.vms.vms)
    await pooled.control.SetGuestIdentity(relay_pb2.SetGuestIdentityRequest(vm_id="sbx-claimed", hostname="mine"))
    after = channel_of(pooled, "sbx-claimed")
    assert after is before and not after.is_closed and after.target.vm_id == "sbx-claimed"
    facts = await pooled.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="sbx-claimed", timeout_ms=5000))
    assert facts.hostname == "mine"


async def test_a_removed_vm_without_a_successor_loses_its_channel(pooled):
    channel = channel_of(pooled, "pool-1")
    await Records(pooled.etcd).delete(VMS, pooled.node, "pool-1")
    await until(lambda: channel.is_closed)
    assert pooled.relay.pool.open_channels() == []


async def test_a_paused_renamed_channel_follows_its_new_records_state(pooled):
    await add_vm(pooled.etcd, pooled.node, "sbx-paused", pooled.socket_path, state=vm_pb2.VM_STATE_PAUSED)
    await Records(pooled.etcd).delete(VMS, pooled.node, "pool-1")
    await until(lambda: "pool-1" not in pooled.relay.vms.vms)
    assert channel_of(pooled, "sbx-paused").paused()
