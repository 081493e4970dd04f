"""Exec and files in a real guest under QEMU, through gateway, relay and agent."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from services.common.settings import ComputeSettings
from services.compute import hypervisor
from tests.guests import sha256

pytestmark = pytest.mark.guest


def test_exec_keeps_stdout_and_stderr_apart_and_returns_the_exit_code(gateway, sandbox):
    result = gateway.exec(sandbox.name, ["sh", "-c", "echo to-out; echo to-err >&2; exit 42"])
    assert (result.stdout, result.stderr, result.exit_code) == (b"to-out\n", b"to-err\n", 42)
    assert result.events[0] == "started" and result.events[-1] == "exited"


def test_exec_reports_the_terminating_signal(gateway, sandbox):
    result = gateway.exec(sandbox.name, ["sh", "-c", "kill -TERM $$"])
    assert result.exited.WhichOneof("status") == "signal" and result.exited.signal == 15


def test_exec_timeout_kills_the_process_and_says_so(gateway, sandbox):
    started = time.monotonic()
    result = gateway.exec(sandbox.name, ["sleep", "60"], timeout=60, **{"process_timeout": 1})
    assert result.exited.timed_out and result.exited.signal == 9
    assert time.monotonic() - started < 30


def test_exec_passes_env_cwd_and_user(gateway, sandbox):
    result = gateway.exec(
        sandbox.name, ["sh", "-c", 'echo "$COLOR"; pwd; id -u'], env={"COLOR": "teal"}, cwd="/tmp", user="nobody"
    )
    assert result.stdout.decode().split() == ["teal", "/tmp", "65534"]


def test_exec_echoes_stdin(gateway, sandbox):
    payload = os.urandom(300_000)
    result = gateway.exec(sandbox.name, ["cat"], stdin=payload)
    assert result.stdout == payload


def test_exec_runs_python_in_the_guest(gateway, sandbox):
    assert gateway.exec(sandbox.name, ["python3", "-c", "print(6*7)"]).stdout == b"42\n"


def test_exec_carries_binary_output_unchanged(gateway, sandbox):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 1000)"
    assert gateway.exec(sandbox.name, ["python3", "-c", script]).stdout == bytes(range(256)) * 1000


def test_64_mib_of_output_arrive_intact(gateway, sandbox):
    result = gateway.exec(
        sandbox.name,
        ["sh", "-c", "head -c 67108864 /dev/urandom > /root/big; sha256sum /root/big >&2; cat /root/big; rm /root/big"],
    )
    assert len(result.stdout) == 64 << 20
    assert sha256(result.stdout) == result.stderr.split()[0].decode()


def test_twenty_concurrent_execs_in_one_sandbox(gateway, sandbox):
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: gateway.exec(sandbox.name, ["sh", "-c", f"sleep 1; echo {i}"]), range(20)))
    assert sorted(int(r.stdout) for r in results) == list(range(20))


def test_missing_command_is_not_found(gateway, sandbox):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.exec(sandbox.name, ["no-such-program"])
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelled_exec_kills_the_guest_process(gateway, sandbox):
    stream = gateway.stub.Exec(
        api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["sh", "-c", "echo up; exec sleep 1000"])),
        timeout=60,
    )
    pid = None
    for event in stream:
        if event.HasField("started"):
            pid = event.started.pid
        if event.stdout:
            break
    stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = gateway.exec(sandbox.name, ["sh", "-c", f"kill -0 {pid} 2>/dev/null && echo alive || echo gone"])
        if alive.stdout == b"gone\n":
            break
        time.sleep(0.2)
    assert alive.stdout == b"gone\n"


def test_exec_deadline_propagates_to_the_guest(gateway, sandbox):
    marker = f"/tmp/deadline-{os.getpid()}"
    with pytest.raises(grpc.RpcError) as failure:
        gateway.exec(sandbox.name, ["sh", "-c", f"while true; do touch {marker}; sleep 0.1; done"], timeout=2)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1)
    gateway.exec(sandbox.name, ["rm", "-f", marker])
    time.sleep(0.5)
    assert gateway.exec(sandbox.name, ["ls", marker]).exit_code != 0


def test_100_mib_file_round_trip_is_intact(gateway, sandbox):
    data = os.urandom(100 << 20)
    written = gateway.write_file(sandbox.name, "/root/data/blob.bin", data, make_parents=True)
    assert written.sha256 == sha256(data) and written.file.size == len(data)
    guest_digest = gateway.exec(sandbox.name, ["sha256sum", "/root/data/blob.bin"]).stdout.split()[0].decode()
    assert guest_digest == sha256(data)
    assert sha256(gateway.read_file(sandbox.name, "/root/data/blob.bin")) == sha256(data)
    gateway.exec(sandbox.name, ["rm", "/root/data/blob.bin"])


def test_missing_paths_are_not_found(gateway, sandbox):
    for call in (
        lambda: gateway.read_file(sandbox.name, "/no/such/file"),
        lambda: gateway.stub.Stat(api.StatRequest(sandbox=sandbox.name, path="/no/such"), timeout=30),
        lambda: gateway.stub.ListDir(api.ListDirRequest(sandbox=sandbox.name, path="/no/such"), timeout=30),
        lambda: gateway.write_file(sandbox.name, "/no/such/dir/file", b"x"),
    ):
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND, failure.value.details()


def test_directory_operations(gateway, sandbox):
    stub = gateway.stub
    made = stub.MakeDir(api.MakeDirRequest(sandbox=sandbox.name, path="/srv/a/b", parents=True), timeout=30)
    assert made.directory.path == "/srv/a/b"
    gateway.write_file(sandbox.name, "/srv/a/file.txt", b"hello", mode=0o600)
    listed = stub.ListDir(api.ListDirRequest(sandbox=sandbox.name, path="/srv/a"), timeout=30)
    assert [(e.path, e.size) for e in listed.entries] == [("/srv/a/b", listed.entries[0].size), ("/srv/a/file.txt", 5)]
    assert stub.Stat(api.StatRequest(sandbox=sandbox.name, path="/srv/a/file.txt"), timeout=30).file.mode == 0o600
    with pytest.raises(grpc.RpcError) as failure:
        stub.Remove(api.RemoveRequest(sandbox=sandbox.name, path="/srv/a"), timeout=30)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.Remove(api.RemoveRequest(sandbox=sandbox.name, path="/srv/a", recursive=True), timeout=30)
    assert gateway.exec(sandbox.name, ["test", "-e", "/srv/a"]).exit_code == 1


def test_relative_path_is_invalid_argument(gateway, sandbox):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.stub.Stat(api.StatRequest(sandbox=sandbox.name, path="etc/passwd"), timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_sandbox_is_not_found_with_a_reason(gateway):
    with pytest.raises(grpc.RpcError) as failure:
        gateway.exec("sandboxes/sbx-doesnotexist", ["true"])
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(failure.value).reason == "SANDBOX_NOT_FOUND"


def test_signals_to_pid_1_and_impossible_terminal_sizes_leave_the_guest_running(gateway, sandbox):
    # The agent is the guest's PID 1: a process in the guest signalling it must not take the VM down.
    result = gateway.exec(sandbox.name, ["sh", "-c", "kill -INT 1; kill -TERM 1; kill -HUP 1; kill -USR1 1; echo sent"])
    assert result.stdout == b"sent\n"

    def interactive():
        yield api.ExecInteractiveRequest(
            config=api.ExecInteractiveConfig(
                sandbox=sandbox.name, process=api.ProcessConfig(argv=["sleep", "5"], pty=True)
            )
        )
        yield api.ExecInteractiveRequest(resize=api.TerminalSize(cols=70000, rows=70000))

    with pytest.raises(grpc.RpcError) as failure:
        for _ in gateway.stub.ExecInteractive(interactive(), timeout=30):
            pass
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert gateway.exec(sandbox.name, ["echo", "still here"]).stdout == b"still here\n"


def test_a_fork_bomb_fills_only_the_capped_workload_and_exec_still_reports(gateway):
    """The guest's processes are capped (the workload cgroup's pids.max, about one per MiB of guest memory): a
    bomb stops at the cap, its exec reports an exit, the agent still answers, and a further exec is refused with a
    clear status instead of hanging."""
    bombed = gateway.create()
    try:
        bomb = "i=0; while [ $i -lt 5000 ]; do sleep 600 & i=$((i+1)); done; echo survived $i"
        result = gateway.exec(bombed.name, ["sh", "-c", bomb], timeout=300)
        assert result.exit_code != 0 or b"survived 5000" not in result.stdout  # it hit the cap
        cap = int(gateway.read_file(bombed.name, "/sys/fs/cgroup/workload/pids.max"))
        held = int(gateway.read_file(bombed.name, "/sys/fs/cgroup/workload/pids.current"))
        assert 256 <= cap < 5000 and held >= cap - 1
        # Spawns migrate the agent in and out of that cgroup: cheap only with favordynmods (workload.py).
        mounts = gateway.read_file(bombed.name, "/proc/mounts").decode()
        assert "favordynmods" in next(line for line in mounts.splitlines() if " /sys/fs/cgroup " in line)
        # compute.guest_aslr (auto): no address space randomization under TCG, where it cost every exec (settings.py).
        accel = hypervisor.choose("qemu", "auto", "qemu-system-x86_64", "cloud-hypervisor").accel
        expected = b"2" if ComputeSettings().aslr_for(accel) else b"0"
        assert gateway.read_file(bombed.name, "/proc/sys/kernel/randomize_va_space").strip() == expected
        with pytest.raises(grpc.RpcError) as refused:
            gateway.exec(bombed.name, ["true"], timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "maximum" in refused.value.details()
    finally:
        gateway.delete(bombed.name)


@pytest.mark.parametrize("size_mib", [1, 8, 32])
def test_sdk_write_of_a_file_onto_a_directory_is_failed_precondition_at_any_size(stack, sandbox, size_mib):
    """`mvm cp` of 8 MB or more onto a directory answered INTERNAL (grpc's asyncio client, in the SDK and in the
    gateway forwarding to the relay, reports INTERNAL when a call ends while it still writes: grpc/grpc#36066)."""
    from microvm_sandbox import Client, FailedPreconditionError, Sandbox

    client = Client(stack.gateway_address, stack.admin_key)
    try:
        target = Sandbox.connect(sandbox.name, client=client)
        for _ in range(3):
            with pytest.raises(FailedPreconditionError):
                target.write("/tmp", os.urandom(size_mib << 20))
    finally:
        client.close()


def test_a_directory_goes_in_and_out_as_tar_while_a_watch_sees_it(stack, sandbox, tmp_path):
    from microvm_sandbox import Client, Sandbox
    from microvm_sandbox.file_types import FilesystemEventType

    local = tmp_path / "tree"
    (local / "deep" / "er").mkdir(parents=True)
    (local / "deep" / "er" / "data.bin").write_bytes(os.urandom(5 << 20))
    (local / "top.txt").write_text("top")
    client = Client(stack.gateway_address, stack.admin_key)
    try:
        target = Sandbox.connect(sandbox.name, client=client)
        target.files.make_dir("/root/w")
        with target.files.watch_dir("/root/w", recursive=True) as watch:
            target.upload(local, "/root/w/tree")
            target.files.rename("/root/w/tree/top.txt", "/root/w/tree/deep/top.txt")
            seen = set()
            for event in watch:
                seen.add((event.type, event.path))
                if (FilesystemEventType.RENAME, "/root/w/tree/deep/top.txt") in seen:
                    break
        assert (FilesystemEventType.CREATE, "/root/w/tree") in seen
        target.download("/root/w/tree", tmp_path / "back")
        assert (tmp_path / "back" / "deep" / "er" / "data.bin").read_bytes() == (
            local / "deep" / "er" / "data.bin"
        ).read_bytes()
        assert (tmp_path / "back" / "deep" / "top.txt").read_text() == "top"
    finally:
        client.close()
