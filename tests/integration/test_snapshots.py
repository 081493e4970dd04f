"""Snapshots, restore, fork, pause/resume against real guests."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.common.errors import error_info
from tests.integration.test_sandbox_lifecycle import etcd_keys, instances, vm_pid, wait_for

pytestmark = pytest.mark.guest
COUNTER = 'nohup sh -c "i=0; while true; do i=\\$((i+1)); echo \\$i > /tmp/count; sleep 0.1; done" >/dev/null 2>&1 &'


def snapshot_of(gateway, sandbox, **fields) -> sandbox_pb2.Snapshot:
    return gateway.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=sandbox.name, **fields), timeout=300).snapshot


def restore(gateway, snapshot) -> sandbox_pb2.Sandbox:
    return gateway.stub.RestoreSnapshot(api.RestoreSnapshotRequest(snapshot=snapshot.name), timeout=300).sandbox


def count(gateway, sandbox) -> int:
    return int(gateway.exec(sandbox.name, ["cat", "/tmp/count"]).stdout)


def store_stub(stack):
    return snapshot_pb2_grpc.SnapshotStoreServiceStub(stack.internal_channel(instances(stack, "snapshot")[-1].address))


@pytest.fixture(scope="module")
def counting_sandbox(gateway):
    """A guest with a file on disk and a process counting in memory."""
    sandbox = gateway.create(labels={"suite": "snapshots"})
    gateway.write_file(sandbox.name, "/root/note.txt", b"written before the snapshot")
    gateway.exec(sandbox.name, ["sh", "-c", COUNTER])
    assert wait_for(lambda: int(gateway.exec(sandbox.name, ["cat", "/tmp/count"]).stdout or 0) >= 20, timeout=30)
    yield sandbox
    gateway.delete(sandbox.name)


def test_restore_keeps_files_and_processes_continue_from_their_count(gateway, counting_sandbox):
    before_snapshot = count(gateway, counting_sandbox)
    snapshot = snapshot_of(gateway, counting_sandbox)
    clone = restore(gateway, snapshot)
    try:
        assert clone.source_snapshot == snapshot.name and clone.state == sandbox_pb2.SANDBOX_STATE_RUNNING
        assert gateway.read_file(clone.name, "/root/note.txt") == b"written before the snapshot"
        first = count(gateway, clone)
        # The count resumes from where it was at the snapshot, not from zero, and keeps going.
        assert first >= before_snapshot >= 20
        assert wait_for(lambda: count(gateway, clone) > first, timeout=10)
        assert gateway.exec(clone.name, ["hostname"]).stdout.decode().strip() == clone.name.split("/")[1]
    finally:
        gateway.delete(clone.name)


def test_fork_makes_independent_clones_with_their_own_identity(gateway, counting_sandbox):
    forked = gateway.stub.ForkSandbox(
        api.ForkSandboxRequest(name=counting_sandbox.name, count=4, labels={"fork": "yes"}), timeout=600
    )
    clones = list(forked.sandboxes)
    try:
        assert len(clones) == 4 and forked.snapshot.source_sandbox == counting_sandbox.name
        for index, clone in enumerate(clones):
            gateway.write_file(clone.name, "/root/mine.txt", f"clone {index}".encode())
        for index, clone in enumerate(clones):
            assert gateway.read_file(clone.name, "/root/mine.txt") == f"clone {index}".encode()
        assert gateway.exec(counting_sandbox.name, ["test", "-e", "/root/mine.txt"]).exit_code == 1
        with ThreadPoolExecutor(4) as pool:
            outputs = list(
                pool.map(
                    lambda c: (
                        gateway.exec(c.name, ["sh", "-c", "hostname; head -c16 /dev/urandom | od -An -tx1"]).stdout
                    ),
                    clones,
                )
            )
        hostnames = {o.split(b"\n")[0] for o in outputs}
        randomness = {b"".join(o.split(b"\n")[1:]) for o in outputs}
        assert len(hostnames) == 4 and len(randomness) == 4
    finally:
        for clone in clones:
            gateway.delete(clone.name)


def test_clones_of_a_snapshot_whose_ram_is_in_its_stream_share_one_ram_file(stack, gateway, counting_sandbox):
    # A restored guest never maps its RAM shared, so a snapshot of it carries its RAM in the migration stream; a
    # fork's clones, the first one too, restore from a RAM file made of it once (services/compute/snapshots.py).
    restored = restore(gateway, snapshot_of(gateway, counting_sandbox))
    clones = []
    try:
        forked = gateway.stub.ForkSandbox(api.ForkSandboxRequest(name=restored.name, count=3), timeout=600)
        clones = list(forked.sandboxes)
        frozen = stack.state_dir / "compute" / "snapshots" / forked.snapshot.name.split("/")[1]
        assert {"memory.bin", "devices.bin", "ram"} <= {p.name for p in frozen.iterdir()}
        shared = [line for line in stack.log("compute").splitlines() if "snapshot_memory_shared" in line]
        assert any(frozen.name in line for line in shared), shared[-3:]
        mapping = f"mem-path={frozen / 'ram'},".encode()
        assert len([c for c in vmm_command_lines() if mapping in c]) == 3  # none of them loaded the stream
        for clone in clones:  # memory as it was: the file the note is in, and the counting process goes on
            assert gateway.read_file(clone.name, "/root/note.txt") == b"written before the snapshot"
            first = count(gateway, clone)
            assert wait_for(lambda c=clone, f=first: count(gateway, c) > f, timeout=10)
    finally:
        for sandbox in [*clones, restored]:
            gateway.delete(sandbox.name)


def vmm_command_lines() -> list[bytes]:
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            pass
    return [line for line in lines if line.startswith(b"qemu-system")]


def test_lineage_records_the_parent_snapshot(gateway, counting_sandbox):
    root = snapshot_of(gateway, counting_sandbox)
    clone = restore(gateway, root)
    try:
        child = snapshot_of(gateway, clone, labels={"gen": "2"})
        assert child.parent_snapshot == root.name and child.source_sandbox == clone.name
        children = gateway.stub.ListSnapshots(api.ListSnapshotsRequest(parent_snapshot=root.name), timeout=10)
        assert [s.name for s in children.snapshots] == [child.name]
        of_clone = gateway.stub.ListSnapshots(api.ListSnapshotsRequest(source_sandbox=clone.name), timeout=10)
        assert [s.name for s in of_clone.snapshots] == [child.name]
    finally:
        gateway.delete(clone.name)


def test_corrupt_chunk_refuses_restore_with_data_loss(stack, gateway, counting_sandbox):
    # Random bytes in the guest's page cache: its memory then holds chunks no other snapshot has (a guest that
    # changed little since its last snapshot may have none).
    gateway.exec(counting_sandbox.name, ["sh", "-c", "head -c 8388608 /dev/urandom > /root/unique.bin"])
    snapshot = snapshot_of(gateway, counting_sandbox)
    record = (
        store_stub(stack)
        .GetSnapshotRecord(snapshot_pb2.GetSnapshotRecordRequest(id=snapshot.name.split("/")[1]), timeout=10)
        .record
    )
    # Its RAM: in the migration stream (`memory`), or a file of its own (`ram`) when the source booted cold.
    memory = next(a for a in record.artifacts if a.name in ("memory", "ram"))
    # A chunk only this snapshot has, so other snapshots stay intact.
    others = store_stub(stack).ListSnapshotRecords(snapshot_pb2.ListSnapshotRecordsRequest(), timeout=10).records
    shared = {d for r in others if r.id != record.id for a in r.artifacts for d in a.chunk_sha256}
    digest = next(d for d in memory.chunk_sha256 if d not in shared)
    chunk = stack.state_dir / "snapshot" / "chunks" / digest[:2] / digest
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    before = {s.name for s in gateway.stub.ListSandboxes(api.ListSandboxesRequest(), timeout=10).sandboxes}
    with pytest.raises(grpc.RpcError) as failure:
        restore(gateway, snapshot)
    assert failure.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_info(failure.value).reason == "SNAPSHOT_CORRUPT"
    after = {s.name for s in gateway.stub.ListSandboxes(api.ListSandboxesRequest(), timeout=10).sandboxes}
    assert after == before  # nothing was booted from the corrupt state
    gateway.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), timeout=10)


def test_retention_and_garbage_collection_free_space(stack, gateway):
    sandbox = gateway.create()
    store = store_stub(stack)
    try:
        snapshots = [snapshot_of(gateway, sandbox) for _ in range(4)]
        expiring = snapshot_of(gateway, sandbox, ttl=duration_pb2.Duration(seconds=1))
        gateway.exec(sandbox.name, ["sh", "-c", "head -c 30000000 /dev/urandom > /root/noise"])
        unique = snapshot_of(gateway, sandbox)
        used_before = store.GetStorageUsage(snapshot_pb2.GetStorageUsageRequest(), timeout=10).stored_bytes
        time.sleep(1.5)
        gateway.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=unique.name), timeout=10)
        collected = store.CollectGarbage(snapshot_pb2.CollectGarbageRequest(), timeout=60)
        # keep_last_per_sandbox is 3 in the test stack: the oldest goes, and so does the expired one.
        expired = {f"snapshots/{s}" for s in collected.expired_snapshots}
        assert {snapshots[0].name, expiring.name} <= expired
        assert collected.freed_bytes > 30_000_000 * 0.9  # the noise only `unique` held
        used_after = store.GetStorageUsage(snapshot_pb2.GetStorageUsageRequest(), timeout=10).stored_bytes
        assert used_after <= used_before - collected.freed_bytes
        remaining = gateway.stub.ListSnapshots(api.ListSnapshotsRequest(source_sandbox=sandbox.name), timeout=10)
        assert [s.name for s in remaining.snapshots] == [s.name for s in snapshots[1:]]
        # Retention gives the storage quota back too, as an explicit DeleteSnapshot does.
        reservations = etcd_keys(stack, "/microvm/auth/reservations/")
        for name in expired:
            assert not [k for k in reservations if k.endswith(f"/snapshot-{name.split('/')[1]}")], name
        assert [k for k in reservations if k.endswith(f"/snapshot-{snapshots[1].name.split('/')[1]}")]
        assert not etcd_keys(stack, "/microvm/snapshot-quota-releases/")
    finally:
        gateway.delete(sandbox.name)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_paused_sandbox_does_not_consume_cpu(stack, gateway, sandbox):
    pid = vm_pid(stack, sandbox.name.split("/")[1])
    paused = gateway.stub.PauseSandbox(api.PauseSandboxRequest(name=sandbox.name), timeout=30).sandbox
    try:
        assert paused.state == sandbox_pb2.SANDBOX_STATE_PAUSED
        with pytest.raises(grpc.RpcError) as failure:
            gateway.exec(sandbox.name, ["true"])
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        before = cpu_seconds(pid)
        time.sleep(5)
        used = cpu_seconds(pid) - before
        assert used <= 0.05, f"a paused VMM used {used:.2f} s of CPU in 5 s"
    finally:
        resumed = gateway.stub.ResumeSandbox(api.ResumeSandboxRequest(name=sandbox.name), timeout=30).sandbox
    assert resumed.state == sandbox_pb2.SANDBOX_STATE_RUNNING
    assert gateway.exec(sandbox.name, ["echo", "awake"]).stdout == b"awake\n"


def test_snapshots_survive_a_restart_of_the_snapshot_service(stack, gateway, counting_sandbox):
    snapshot = snapshot_of(gateway, counting_sandbox)
    old = instances(stack, "snapshot")[0]
    os.kill(old.pid, signal.SIGKILL)
    assert wait_for(lambda: [i for i in instances(stack, "snapshot") if i.pid != old.pid], timeout=20)
    time.sleep(2.5)  # the dead instance's registration expires
    assert (
        gateway.stub.GetSnapshot(api.GetSnapshotRequest(name=snapshot.name), timeout=10).snapshot.name == snapshot.name
    )
    clone = restore(gateway, snapshot)
    gateway.delete(clone.name)
