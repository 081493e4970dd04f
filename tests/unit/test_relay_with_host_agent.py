"""The relay against the real agent engine running on this host over a unix socket (no VM): protocol,
multiplexing, flow control and error mapping, fast."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time

import grpc
import pytest

from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import ErrorMappingInterceptor
from services.common.settings import RelaySettings
from services.relay.server import RelayServicer
from tests.stack import REPO

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def relay(tmp_path):
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "microvm_agent.main", "--unix", socket_path],
        cwd=REPO / "guest_agents" / "linux",
        env=dict(os.environ, PYTHONPATH=f"{REPO / 'gen' / 'python'}"),
    )
    for _ in range(200):
        if os.path.exists(socket_path):
            break
        await asyncio.sleep(0.02)
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    servicer = RelayServicer(RelaySettings(connect_timeout_seconds=3))
    relay_pb2_grpc.add_RelayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = relay_pb2_grpc.RelayServiceStub(channel)
    stub.target = relay_pb2.AgentTarget(vm_id="host", socket_path=socket_path, transport="virtio-serial")
    stub.tmp = tmp_path
    yield stub
    await channel.close()
    await servicer.pool.close_all()
    await server.stop(0)
    agent.kill()
    agent.wait()


async def run(stub, argv, **kwargs):
    stdout, stderr, events = b"", b"", []
    async for response in stub.Exec(
        relay_pb2.ExecRequest(
            target=stub.target, process=api.ProcessConfig(argv=argv, **kwargs.pop("process", {})), **kwargs
        )
    ):
        event = response.event
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
        relay_pb2.ExecRequest(
            target=relay.target,
            process=api.ProcessConfig(
                argv=["sh", "-c", f"touch {marker}; echo started; while true; do touch {marker}; sleep 0.05; done"]
            ),
        )
    )
    async for response in call:
        if response.event.stdout:
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
        yield relay_pb2.WriteFileRequest(
            target=relay.target,
            request=api.WriteFileRequest(header=api.WriteFileHeader(path=path, make_parents=True, mode=0o600)),
        )
        for offset in range(0, len(payload), 1 << 20):
            yield relay_pb2.WriteFileRequest(request=api.WriteFileRequest(data=payload[offset : offset + (1 << 20)]))

    written = await relay.WriteFile(requests())
    assert written.response.sha256 == hashlib.sha256(payload).hexdigest()
    assert written.response.file.size == len(payload) and written.response.file.mode == 0o600
    read = b"".join(
        [
            r.data
            async for r in relay.ReadFile(
                relay_pb2.ReadFileRequest(target=relay.target, request=api.ReadFileRequest(path=path))
            )
        ]
    )
    assert read == payload


async def test_file_errors_map_to_statuses(relay):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in relay.ReadFile(
            relay_pb2.ReadFileRequest(target=relay.target, request=api.ReadFileRequest(path="/no/such/file"))
        ):
            pass
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.Stat(relay_pb2.StatRequest(target=relay.target, path="relative"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_directories_can_be_made_listed_and_removed(relay):
    base = str(relay.tmp / "d")
    await relay.MakeDir(relay_pb2.MakeDirRequest(target=relay.target, path=base + "/a/b", parents=True))
    listed = await relay.ListDir(relay_pb2.ListDirRequest(target=relay.target, path=base))
    assert [e.path for e in listed.entries] == [base + "/a"]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.Remove(relay_pb2.RemoveRequest(target=relay.target, path=base))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await relay.Remove(relay_pb2.RemoveRequest(target=relay.target, path=base, recursive=True))
    assert not os.path.exists(base)


async def test_unreachable_agent_is_unavailable(relay):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await relay.PingAgent(
            relay_pb2.PingAgentRequest(
                target=relay_pb2.AgentTarget(vm_id="gone", socket_path=str(relay.tmp / "missing.sock"))
            )
        )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_slow_client_applies_back_pressure_to_the_process(relay):
    progress = relay.tmp / "progress"
    script = (
        "import os,sys\nn=0\nchunk=b'x'*65536\nwhile n < 200_000_000:\n"
        f"    sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush(); n+=len(chunk)\n"
        f"    open('{progress}','w').write(str(n))\n"
    )
    call = relay.Exec(
        relay_pb2.ExecRequest(target=relay.target, process=api.ProcessConfig(argv=[sys.executable, "-c", script]))
    )
    async for response in call:
        if response.event.stdout:
            break
    await asyncio.sleep(2)  # the client reads nothing meanwhile
    written = int(progress.read_text())
    call.cancel()
    # Credit (1 MiB) + pipe + HTTP/2 windows: far below what an unbounded relay would have taken.
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
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await relay.PingAgent(
                relay_pb2.PingAgentRequest(target=relay_pb2.AgentTarget(vm_id="hostile", socket_path=path)), timeout=15
            )
        assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
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


async def test_interactive_exec_takes_stdin_resize_and_signals(relay):
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        yield relay_pb2.ExecInteractiveRequest(
            target=relay.target,
            request=api.ExecInteractiveRequest(
                config=api.ExecInteractiveConfig(
                    process=api.ProcessConfig(
                        argv=["sh", "-c", "read line; echo got:$line; stty size; sleep 30"], pty=True
                    )
                )
            ),
        )
        while (message := await queue.get()) is not None:
            yield relay_pb2.ExecInteractiveRequest(request=message)

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
