"""The relay against the real agent engine running on this host over a unix socket (no VM): protocol,
multiplexing, flow control and error mapping, fast."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from microvm.types.v1 import vm_pb2
from services.common.errors import ErrorMappingInterceptor
from services.common.records import VMS, Records
from services.common.settings import RelaySettings
from services.relay.server import DataPlaneServicer, GuestControlServicer, NodeRelay
from tests.stack import REPO

pytestmark = pytest.mark.timeout(60)


async def start_agent(socket_path: str, *extra: str) -> subprocess.Popen:
    agent = subprocess.Popen(
        [sys.executable, "-m", "microvm_agent.main", "--unix", socket_path, *extra],
        cwd=REPO / "guest_agents" / "linux",
        env=dict(os.environ, PYTHONPATH=f"{REPO / 'gen' / 'python'}"),
    )
    for _ in range(200):
        if os.path.exists(socket_path):
            break
        await asyncio.sleep(0.02)
    return agent


async def add_vm(etcd, node: str, vm_id: str, socket_path: str, state=vm_pb2.VM_STATE_RUNNING) -> None:
    """A VM record as compute would write it, pointing the relay at `socket_path`."""
    vm = vm_pb2.VmRecord(
        id=vm_id,
        node=node,
        state=state,
        agent=vm_pb2.AgentEndpoint(transport=vm_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL, socket_path=socket_path),
    )
    await Records(etcd).put(VMS, vm, node, vm_id)


@contextlib.asynccontextmanager
async def serve_relay(etcd, node_name: str, settings: RelaySettings, tmp_path):
    """The relay of node `node_name` on a real gRPC server: a SandboxService stub (data plane) with `.control`."""
    node = NodeRelay(etcd, node_name, settings)
    await node.vms.open()
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(DataPlaneServicer(node.processes, node.files), server)
    relay_pb2_grpc.add_GuestControlServiceServicer_to_server(GuestControlServicer(node.control), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = sandbox_service_pb2_grpc.SandboxServiceStub(channel)
    stub.control = relay_pb2_grpc.GuestControlServiceStub(channel)
    stub.name, stub.tmp, stub.etcd, stub.node, stub.relay = "sandboxes/host", tmp_path, etcd, node_name, node
    try:
        yield stub
    finally:
        await channel.close()
        await node.close()
        await server.stop(0)


@pytest.fixture
async def relay(tmp_path, etcd, node_name):
    """The relay of node `node_name`, with one "VM" (`sandboxes/host`): the agent engine on this host."""
    socket_path = str(tmp_path / "agent.sock")
    agent = await start_agent(socket_path)
    await add_vm(etcd, node_name, "host", socket_path)
    async with serve_relay(etcd, node_name, RelaySettings(connect_timeout_seconds=3), tmp_path) as stub:
        yield stub
    agent.kill()
    agent.wait()


async def run(stub, argv, **kwargs):
    stdout, stderr, events = b"", b"", []
    async for event in stub.Exec(
        api.ExecRequest(
            sandbox=kwargs.pop("sandbox", stub.name),
            process=api.ProcessConfig(argv=argv, **kwargs.pop("process", {})),
            **kwargs,
        )
    ):
        events.append(event.WhichOneof("event"))
        stdout += event.stdout
        stderr += event.stderr
        if event.HasField("exited"):
            return stdout, stderr, event.exited, events
    raise AssertionError("stream ended without an exited event")


async def test_exec_streams_stdout_and_stderr_apart_and_reports_exit_code(relay):
    stdout, stderr, exited, events = await run(relay, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (stdout, stderr, exited.exit_code) == (b"out\n", b"err\n", 3)
    assert events[0] == "started" and events[-1] == "exited"


async def test_exec_reports_terminating_signal(relay):
    _, _, exited, _ = await run(relay, ["sh", "-c", "kill -9 $$"])
    assert exited.WhichOneof("status") == "signal" and exited.signal == 9


async def test_exec_passes_stdin_env_and_cwd(relay):
    stdout, _, _, _ = await run(
        relay,
        ["sh", "-c", 'cat; echo "$GREETING"; pwd'],
        stdin=b"hello\n",
        process={"env": {"GREETING": "hi"}, "cwd": "/tmp"},
    )
    assert stdout == b"hello\nhi\n/tmp\n"


async def test_exec_timeout_kills_the_process(relay):
    started = time.monotonic()
    _, _, exited, _ = await run(relay, ["sleep", "30"], process={"timeout": {"seconds": 0, "nanos": 300_000_000}})
    assert exited.timed_out and exited.signal == 9 and time.monotonic() - started < 5


async def test_missing_command_is_not_found(relay):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await run(relay, ["definitely-not-a-command"])
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_large_output_arrives_intact_under_flow_control(relay):
    stdout, _, exited, _ = await run(relay, ["sh", "-c", "head -c 20000000 /dev/urandom | tee /dev/stderr | sha256sum"])
    # The digest on stdout is computed in the "guest"; the bytes on stderr crossed the channel.
    assert exited.exit_code == 0


async def test_concurrent_execs_share_one_channel(relay):
    results = await asyncio.gather(*(run(relay, ["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(20)))
    assert sorted(int(r[0]) for r in results) == list(range(20))


async def test_cancelled_exec_kills_the_guest_process(relay):
    marker = relay.tmp / "alive"
    call = relay.Exec(
        api.ExecRequest(
            sandbox=relay.name,
            process=api.ProcessConfig(
                argv=["sh", "-c", f"touch {marker}; echo started; while true; do touch {marker}; sleep 0.05; done"]
            ),
        )
    )
    async for event in call:
        if event.stdout:
            break
    call.cancel()
    await asyncio.sleep(0.5)
    marker.unlink(missing_ok=True)
    await asyncio.sleep(0.3)
    assert not marker.exists()


async def test_file_round_trip_keeps_content_and_reports_sha256(relay):
    payload = os.urandom(5 * 1024 * 1024 + 17)
    path = str(relay.tmp / "sub" / "blob.bin")

    async def requests():
        yield api.WriteFileRequest(
            header=api.WriteFileHeader(sandbox=relay.name, path=path, make_parents=True, mode=0o600)
        )
        for offset in range(0, len(payload), 1 << 20):
            yield api.WriteFileRequest(data=payload[offset : offset + (1 << 20)])

    written = await relay.WriteFile(requests())
    assert written.sha256 == hashlib.sha256(payload).hexdigest()
    assert written.file.size == len(payload) and written.file.mode == 0o600
    read = b"".join([r.data async for r in relay.ReadFile(api.ReadFileRequest(sandbox=relay.name, path=path))])
    assert read == payload


async def test_file_errors_map_to_statuses(relay):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in relay.ReadFile(api.ReadFileRequest(sandbox=relay.name, path="/no/such/file")):
            pass
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.Stat(api.StatRequest(sandbox=relay.name, path="relative"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_directories_can_be_made_listed_and_removed(relay):
    base = str(relay.tmp / "d")
    await relay.MakeDir(api.MakeDirRequest(sandbox=relay.name, path=base + "/a/b", parents=True))
    listed = await relay.ListDir(api.ListDirRequest(sandbox=relay.name, path=base))
    assert [e.path for e in listed.entries] == [base + "/a"]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.Remove(api.RemoveRequest(sandbox=relay.name, path=base))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await relay.Remove(api.RemoveRequest(sandbox=relay.name, path=base, recursive=True))
    assert not os.path.exists(base)


async def test_unreachable_agent_is_unavailable(relay):
    await add_vm(relay.etcd, relay.node, "gone", str(relay.tmp / "missing.sock"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="gone", timeout_ms=500))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_vm_the_node_does_not_have_is_not_found_and_a_stopped_one_is_refused(relay):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await run(relay, ["true"], sandbox="sandboxes/elsewhere")
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    await add_vm(relay.etcd, relay.node, "stopped", str(relay.tmp / "agent.sock"), state=vm_pb2.VM_STATE_STOPPED)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await run(relay, ["true"], sandbox="sandboxes/stopped")
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_guest_control_runs_commands_and_sets_a_simulated_identity(relay, tmp_path):
    socket_path = str(tmp_path / "simulated.sock")
    (tmp_path / "root").mkdir()
    agent = await start_agent(socket_path, "--root", str(tmp_path / "root"), "--hostname", "before")
    try:
        await add_vm(relay.etcd, relay.node, "sim", socket_path, state=vm_pb2.VM_STATE_CREATING)
        facts = await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="sim", timeout_ms=5000))
        assert facts.hostname == "before"
        await relay.control.SetGuestIdentity(relay_pb2.SetGuestIdentityRequest(vm_id="sim", hostname="after"))
        facts = await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="sim", timeout_ms=5000))
        assert facts.hostname == "after" and socket.gethostname() != "after"
        ran = await relay.control.RunCommand(relay_pb2.RunCommandRequest(vm_id="sim", argv=["sh", "-c", "exit 7"]))
        assert ran.exit_code == 7
    finally:
        agent.kill()
        agent.wait()


async def test_slow_client_applies_back_pressure_to_the_process(relay):
    progress = relay.tmp / "progress"
    script = (
        "import os,sys\nn=0\nchunk=b'x'*65536\nwhile n < 200_000_000:\n"
        f"    sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush(); n+=len(chunk)\n"
        f"    open('{progress}','w').write(str(n))\n"
    )
    call = relay.Exec(
        api.ExecRequest(sandbox=relay.name, process=api.ProcessConfig(argv=[sys.executable, "-c", script]))
    )
    async for event in call:
        if event.stdout:
            break
    await asyncio.sleep(2)  # the client reads nothing meanwhile
    written = int(progress.read_text())
    call.cancel()
    # Credit (1 MiB, and one chunk the relay holds) + pipe + HTTP/2 windows: far below an unbounded relay.
    assert written < 32 << 20, f"the process wrote {written} bytes while nobody read"


async def hostile_guest(path: str, payload: bytes) -> asyncio.AbstractServer:
    async def connected(reader, writer):
        writer.write(payload)
        await writer.drain()
        await reader.read()  # keep the connection open

    return await asyncio.start_unix_server(connected, path)


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(64 << 10),  # noise
        b"\x00\x00\x00\x10" + b"\xff" * 16,  # a frame that is not protobuf
        b"\x7f\xff\xff\xff" + b"x" * 100,  # an impossible length
    ],
)
async def test_hostile_guest_cannot_crash_the_relay(relay, payload):
    path = str(relay.tmp / "hostile.sock")
    server = await hostile_guest(path, payload)
    try:
        await add_vm(relay.etcd, relay.node, "hostile", path)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await relay.control.WaitForAgent(
                relay_pb2.WaitForAgentRequest(vm_id="hostile", timeout_ms=3000), timeout=15
            )
        assert failure.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    finally:
        server.close()
    # The relay still serves well-behaved guests.
    stdout, _, exited, _ = await run(relay, ["echo", "fine"])
    assert stdout == b"fine\n" and exited.exit_code == 0


async def test_pty_mode_gives_a_terminal_of_the_requested_size(relay):
    stdout, _, exited, _ = await run(
        relay, ["sh", "-c", "tty; stty size"], process={"pty": True, "terminal_size": {"cols": 100, "rows": 30}}
    )
    lines = stdout.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["30", "100"] and exited.exit_code == 0


async def test_ctrl_s_in_a_terminals_input_does_not_freeze_its_output(relay):
    """0x13 is XOFF to a terminal with flow control: the process then blocked writing, for good (a fuzz find)."""
    stdout, _, exited, _ = await run(
        relay, ["sh", "-c", "read line; echo after"], process={"pty": True}, stdin=b"\x13\n"
    )
    assert b"after" in stdout and exited.exit_code == 0


async def test_interactive_exec_takes_stdin_resize_and_signals(relay):
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        yield api.ExecInteractiveRequest(
            config=api.ExecInteractiveConfig(
                sandbox=relay.name,
                process=api.ProcessConfig(
                    argv=["sh", "-c", "read line; echo got:$line; stty size; sleep 30"], pty=True
                ),
            )
        )
        while (message := await queue.get()) is not None:
            yield message

    call = relay.ExecInteractive(requests())
    output = b""
    await queue.put(api.ExecInteractiveRequest(resize=api.TerminalSize(cols=132, rows=43)))
    await queue.put(api.ExecInteractiveRequest(stdin=b"hello\n"))
    async for response in call:
        output += response.event.stdout
        if b"43 132" in output:
            await queue.put(api.ExecInteractiveRequest(signal=9))
        if response.event.HasField("exited"):
            assert response.event.exited.signal == 9
            break
    await queue.put(None)
    assert b"got:hello" in output and b"43 132" in output


async def test_the_agent_refuses_bad_process_requests_and_outlives_signals(relay, tmp_path):
    # The agent in simulation mode stands in for PID 1: the relay's checks are bypassed by talking to it directly.
    from microvm.agent.v1 import agent_pb2
    from services.relay.agent_channel import AgentChannel, AgentTarget

    socket_path = str(tmp_path / "pid1.sock")
    (tmp_path / "root").mkdir()
    agent = await start_agent(socket_path, "--root", str(tmp_path / "root"))
    try:
        channel = AgentChannel(AgentTarget("pid1", socket_path))
        await channel.connect(5)
        await channel.wait_until_answering(5)
        for start in (
            agent_pb2.ExecStart(argv=["echo", "a\x00b"]),
            agent_pb2.ExecStart(argv=["true"], env={"A=B": "1"}),
            agent_pb2.ExecStart(argv=["true"], pty=True, cols=70000, rows=10),
        ):
            stream = channel.open_stream()
            await stream.send(exec_start=start)
            frame = await stream.receive(timeout=5)
            assert frame.WhichOneof("body") == "error" and frame.error.code == 3, frame
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(agent.pid, signum)
        await asyncio.sleep(0.3)
        assert agent.poll() is None, "a signal killed the agent"
        assert (await channel.run_to_exit(["true"], timeout=5)).exec_exited.exit_code == 0
        await channel.close()
    finally:
        agent.kill()
        agent.wait()


async def test_an_agent_that_is_not_a_guests_pid_1_never_renames_the_host_it_runs_on(relay):
    # The agent engine on this host (not PID 1, not simulating): an identity is taken as a name to answer with, and
    # the host's own name and /etc/hosts stay as they were.
    before, hosts = socket.gethostname(), Path("/etc/hosts").read_bytes()
    try:
        identity = relay_pb2.SetGuestIdentityRequest(vm_id="host", hostname="renamed-by-a-test")
        await relay.control.SetGuestIdentity(identity, timeout=5)
        facts = await relay.control.WaitForAgent(relay_pb2.WaitForAgentRequest(vm_id="host", timeout_ms=5000))
        assert facts.hostname == "renamed-by-a-test"
        assert socket.gethostname() == before and Path("/etc/hosts").read_bytes() == hosts
    finally:
        if socket.gethostname() != before and os.geteuid() == 0:  # a regression: put the host back
            socket.sethostname(before)
