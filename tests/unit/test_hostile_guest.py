"""A hostile guest harms only itself: its channel's cost to the relay is bounded, a channel that breaks the protocol
is closed and the sandbox marked with the reason, and a neighbour sandbox on the same relay never notices."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from microvm.relay.v1 import relay_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.records import CHANNEL_INCIDENTS, Records
from services.common.settings import RelaySettings
from tests.fakes.hostile_guest import HostileGuest
from tests.unit.test_relay_with_host_agent import add_vm, run, serve_relay, start_agent

pytestmark = pytest.mark.timeout(90)
LIMITS = RelaySettings(
    connect_timeout_seconds=3,
    junk_frames_per_10s=500,
    frame_timeout_seconds=1.0,
    heartbeat_seconds=1.0,
    heartbeat_timeout_seconds=1.0,
    stream_buffer_mib=4,
)


@pytest.fixture
async def relay(tmp_path, etcd, node_name):
    """A relay with a well-behaved neighbour (`sandboxes/host`, the real agent engine) and tight limits."""
    agent = await start_agent(str(tmp_path / "agent.sock"))
    await add_vm(etcd, node_name, "host", str(tmp_path / "agent.sock"))
    async with serve_relay(etcd, node_name, LIMITS, tmp_path) as stub:
        yield stub
    agent.kill()
    agent.wait()


async def hostile(relay, mode: str) -> HostileGuest:
    path = str(relay.tmp / f"{mode}.sock")
    guest = await HostileGuest(path, mode).start()
    await add_vm(relay.etcd, relay.node, mode, path)
    return guest


async def incident(relay, vm_id: str):
    stored = await Records(relay.etcd).get(CHANNEL_INCIDENTS, relay.node, vm_id)
    return stored.message if stored else None


async def neighbour_execs(relay, count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        stdout, _, exited, _ = await run(relay, ["echo", "fine"])
        assert stdout == b"fine\n" and exited.exit_code == 0
        took.append(time.perf_counter() - started)
    return took


async def call_status(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("mode", ["unknown-ids", "malformed"])
async def test_hostile_flood_closes_only_its_own_channel_and_the_neighbour_never_notices(relay, mode):
    guest = await hostile(relay, mode)
    try:
        tasks_before = len(asyncio.all_tasks())
        waiting = asyncio.ensure_future(
            relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id=mode, timeout_ms=2000))
        )
        took = await neighbour_execs(relay, 10)
        await asyncio.gather(waiting, return_exceptions=True)
        found = None
        for _ in range(50):
            if found := await incident(relay, mode):
                break
            await asyncio.sleep(0.1)
        assert found and "served no stream" in found.reason
        assert len(asyncio.all_tasks()) < tasks_before + 10, "the flood made the relay start tasks"
        assert max(took) < 5.0
        code = await call_status(
            relay.Exec(api.ExecRequest(sandbox=f"sandboxes/{mode}", process=api.ProcessConfig(argv=["true"])))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # quarantined: not connected to again
    finally:
        await guest.close()


async def test_hostile_oversize_frame_is_a_violation(relay):
    guest = await hostile(relay, "oversize")
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="oversize", timeout_ms=2000))
        for _ in range(30):
            if await incident(relay, "oversize"):
                break
            await asyncio.sleep(0.1)
        assert "exceeds" in (await incident(relay, "oversize")).reason
        await neighbour_execs(relay, 2)
    finally:
        await guest.close()


async def test_hostile_half_written_frame_ends_the_channel_within_the_frame_deadline(relay):
    guest = await hostile(relay, "half-frame")
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="half-frame", timeout_ms=3000))
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failure.value.details()
        assert "half-written" in failure.value.details()
        for _ in range(40):
            if await incident(relay, "half-frame"):
                break
            await asyncio.sleep(0.1)
        assert "half-written" in (await incident(relay, "half-frame")).reason
        assert time.monotonic() - started < 10
        await neighbour_execs(relay, 2)
    finally:
        await guest.close()


async def test_hostile_agent_restart_ends_a_running_exec_aborted_not_with_an_exit_code(relay):
    guest = await hostile(relay, "restart")
    try:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="restart", timeout_ms=3000))
        code = await call_status(
            relay.Exec(
                api.ExecRequest(sandbox="sandboxes/restart", process=api.ProcessConfig(argv=["sleep", "9"])), timeout=10
            )
        )
        assert code == grpc.StatusCode.ABORTED
    finally:
        await guest.close()


async def test_hostile_output_beyond_its_credit_is_a_violation(relay):
    guest = await hostile(relay, "overflow")
    try:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="overflow", timeout_ms=3000))
        call = relay.Exec(api.ExecRequest(sandbox="sandboxes/overflow", process=api.ProcessConfig(argv=["x"])))
        await call.read()  # started; then the caller reads nothing while the guest sends 64 MiB
        for _ in range(50):
            if await incident(relay, "overflow"):
                break
            await asyncio.sleep(0.1)
        call.cancel()
        assert "beyond the credit" in (await incident(relay, "overflow")).reason
        await neighbour_execs(relay, 2)
    finally:
        await guest.close()


async def test_hostile_watch_changes_beyond_their_credit_are_a_violation(relay):
    """Directory watch changes travel within credit like file data: a guest flooding them loses its channel."""
    guest = await hostile(relay, "watch-flood")
    try:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="watch-flood", timeout_ms=3000))
        call = relay.WatchDir(api.WatchDirRequest(sandbox="sandboxes/watch-flood", path="/tmp"))
        await call.read()  # started; then the caller reads nothing while the guest floods
        for _ in range(50):
            if await incident(relay, "watch-flood"):
                break
            await asyncio.sleep(0.1)
        call.cancel()
        assert "beyond the credit" in (await incident(relay, "watch-flood")).reason
        await neighbour_execs(relay, 2)
    finally:
        await guest.close()


async def test_hostile_silent_agent_is_dropped_by_the_heartbeat(relay):
    guest = await hostile(relay, "silent")
    try:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="silent", timeout_ms=3000))
        started = time.monotonic()
        code = await call_status(
            relay.Exec(
                api.ExecRequest(sandbox="sandboxes/silent", process=api.ProcessConfig(argv=["sleep", "60"])), timeout=20
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 10
        assert await incident(relay, "silent") is None  # silence is not a violation: the next call reconnects
    finally:
        await guest.close()


async def test_stale_bytes_before_the_first_frame_of_a_connection_are_dropped(relay):
    """A guest restored from a snapshot taken mid-frame: the frame's tail comes first and must not end the channel."""
    guest = await hostile(relay, "stale-tail")
    try:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="stale-tail", timeout_ms=5000))
        assert await incident(relay, "stale-tail") is None
    finally:
        await guest.close()


async def test_a_connection_that_never_holds_a_frame_is_a_violation(relay):
    guest = await hostile(relay, "no-frames")
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="no-frames", timeout_ms=10000))
        found = None
        for _ in range(50):
            if found := await incident(relay, "no-frames"):
                break
            await asyncio.sleep(0.1)
        assert found and "before the agent's hello" in found.reason
    finally:
        await guest.close()


async def test_a_paused_guests_silence_does_not_close_its_channel(relay):
    """A paused VM (a pooled one waiting to be handed out) answers no ping: its channel and the streams on it must
    outlive the pause, or every pooled create reconnects to its guest (slowly) when it is handed out."""
    import os
    import signal

    from microvm.types.v1 import vm_pb2
    from tests.unit.test_relay_with_host_agent import add_vm, start_agent

    path = str(relay.tmp / "paused.sock")
    agent = await start_agent(path)
    await add_vm(relay.etcd, relay.node, "paused", path)
    try:
        call = relay.Exec(
            api.ExecRequest(sandbox="sandboxes/paused", process=api.ProcessConfig(argv=["sleep", "3"])), timeout=30
        )
        first = await call.read()
        assert first.HasField("started")
        await add_vm(relay.etcd, relay.node, "paused", path, state=vm_pb2.VM_STATE_PAUSED)
        os.kill(agent.pid, signal.SIGSTOP)  # the guest stands still, as a paused VM does
        await asyncio.sleep(LIMITS.heartbeat_seconds + LIMITS.heartbeat_timeout_seconds + 2)
        await add_vm(relay.etcd, relay.node, "paused", path)
        os.kill(agent.pid, signal.SIGCONT)
        last = first
        while (event := await call.read()) is not grpc.aio.EOF:
            last = event
        assert last.HasField("exited") and last.exited.exit_code == 0, last  # the stream lived through the pause
    finally:
        os.kill(agent.pid, signal.SIGCONT)
        agent.kill()
        agent.wait()


async def test_an_identity_confirmed_later_answers_at_once_and_a_guest_that_never_confirms_it_is_failed(
    relay, tmp_path
):
    # A claimed pool VM: the call returns once the identity is sent; the guest's confirmation is awaited behind it.
    # The well-behaved guest is the agent simulating a guest (--root): a real one would rename this host.
    (tmp_path / "root").mkdir()
    agent = await start_agent(str(tmp_path / "sim.sock"), "--root", str(tmp_path / "root"), "--hostname", "pooled")
    guest = await hostile(relay, "mute-after-identity")
    dying = await hostile(relay, "gone-after-identity")
    try:
        await add_vm(relay.etcd, relay.node, "sim", str(tmp_path / "sim.sock"))
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="sim", timeout_ms=5000))
        claimed = relay_pb2.SetGuestIdentityRequest(vm_id="sim", hostname="claimed", confirm_later=True)
        await relay.control.SetGuestIdentity(claimed, timeout=5)
        reply = await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="sim", timeout_ms=3000))
        assert reply.hostname == "claimed" and socket.gethostname() != "claimed"
        # A VM that dies right after its claim did not break the protocol: compute reports its death, not the relay.
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="gone-after-identity", timeout_ms=3000))
        gone = relay_pb2.SetGuestIdentityRequest(vm_id="gone-after-identity", hostname="gone", confirm_later=True)
        await relay.control.SetGuestIdentity(gone, timeout=5)
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="mute-after-identity", timeout_ms=3000))
        mute = relay_pb2.SetGuestIdentityRequest(vm_id="mute-after-identity", hostname="mute", confirm_later=True)
        await relay.control.SetGuestIdentity(mute, timeout=5)  # answered: the frames went out
        deadline = time.monotonic() + 15
        while (found := await incident(relay, "mute-after-identity")) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert found is not None and "did not confirm its identity" in found.reason, found
        assert await incident(relay, "sim") is None  # the well-behaved one confirmed long before
        # Its confirmation failed at once, on the closed channel, long before the mute one's wait ran out.
        assert await incident(relay, "gone-after-identity") is None
        await neighbour_execs(relay, 2)
    finally:
        await guest.close()
        await dying.close()
        agent.kill()
        agent.wait()
