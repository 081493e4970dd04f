"""What a sandbox was created with stays with it: its environment reaches every command (a command's own env
wins), and a restore or fork keeps the source's labels and environment (found by a new user: labels were lost on
restore and fork). A fork leaves no snapshot behind unless asked to keep it, and one whose clones fit on its node
never uploads one. A whole installation (fake VMM)."""

from __future__ import annotations

import uuid

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


async def run(caller, name: str, argv: list[str], env: dict[str, str] | None = None) -> str:
    request = api.ExecRequest(sandbox=name, process=api.ProcessConfig(argv=argv, env=env or {}))
    output = b""
    async for event in caller.stub.Exec(request, metadata=caller.metadata, timeout=30):
        output += event.stdout
    return output.decode()


async def snapshots_of(caller) -> list[str]:
    listed = await caller.stub.ListSnapshots(api.ListSnapshotsRequest(), metadata=caller.metadata, timeout=10)
    return [snapshot.name for snapshot in listed.snapshots]


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"env-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def source(caller):
    wanted = sandbox_pb2.Sandbox(labels={"team": "red", "job": "a"}, env={"GREETING": "hello", "SHARED": "sandbox"})
    return (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(sandbox=wanted), metadata=caller.metadata, timeout=60)
    ).sandbox


async def test_the_sandbox_env_reaches_every_command_and_a_command_env_wins(caller, source):
    assert dict(source.env) == {"GREETING": "hello", "SHARED": "sandbox"}
    printed = await run(caller, source.name, ["sh", "-c", 'echo "$GREETING $SHARED"'], env={"SHARED": "command"})
    assert printed == "hello command\n"


async def test_a_restore_keeps_the_source_labels_and_env_with_its_own_labels_on_top(caller, source):
    snapshot = (
        await caller.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=source.name), metadata=caller.metadata)
    ).snapshot
    wanted = sandbox_pb2.Sandbox(labels={"job": "b"})
    restored = (
        await caller.stub.RestoreSnapshot(
            api.RestoreSnapshotRequest(snapshot=snapshot.name, sandbox=wanted), metadata=caller.metadata, timeout=60
        )
    ).sandbox
    assert dict(restored.labels) == {"team": "red", "job": "b"}
    assert dict(restored.env) == dict(source.env)
    assert await run(caller, restored.name, ["sh", "-c", "echo $GREETING"]) == "hello\n"
    await caller.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=caller.metadata)


async def test_a_fork_keeps_labels_and_env_and_leaves_no_snapshot_unless_asked(caller, source):
    before = await snapshots_of(caller)
    forked = await caller.stub.ForkSandbox(
        api.ForkSandboxRequest(name=source.name, count=2, labels={"clone": "yes"}), metadata=caller.metadata, timeout=60
    )
    for clone in forked.sandboxes:
        assert dict(clone.labels) == {"team": "red", "job": "a", "clone": "yes"}
        assert dict(clone.env) == dict(source.env)
    assert await snapshots_of(caller) == before
    assert await run(caller, forked.sandboxes[0].name, ["sh", "-c", "echo $GREETING"]) == "hello\n"

    kept = await caller.stub.ForkSandbox(
        api.ForkSandboxRequest(name=source.name, keep_snapshot=True), metadata=caller.metadata, timeout=60
    )
    assert await snapshots_of(caller) == [*before, kept.snapshot.name]


def stored_chunks(installation) -> set[str]:
    return {p.name for p in (installation.state_dir / "snapshot" / "chunks").glob("*/*")}


async def write(caller, name: str, path: str, data: bytes) -> None:
    async def requests():
        yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=name, path=path))
        yield api.WriteFileRequest(data=data)

    await caller.stub.WriteFile(requests(), metadata=caller.metadata, timeout=10)


async def read(caller, name: str, path: str) -> bytes:
    request = api.ReadFileRequest(sandbox=name, path=path)
    return b"".join([m.data async for m in caller.stub.ReadFile(request, metadata=caller.metadata, timeout=10)])


async def test_a_fork_that_keeps_no_snapshot_restores_on_its_node_without_the_snapshot_store(
    installation, caller, source
):
    # A disk no snapshot has yet (a file API write: the fake VMM's guest disk): anything uploaded is new chunks.
    unique = uuid.uuid4().hex.encode()
    await write(caller, source.name, "/root/unique", unique)
    chunks, before = stored_chunks(installation), await snapshots_of(caller)
    forked = await caller.stub.ForkSandbox(
        api.ForkSandboxRequest(name=source.name, count=2), metadata=caller.metadata, timeout=60
    )
    assert stored_chunks(installation) == chunks and await snapshots_of(caller) == before
    for clone in forked.sandboxes:
        assert clone.node == source.node and await read(caller, clone.name, "/root/unique") == unique
    # Kept, it is a snapshot like any other: in the store.
    await caller.stub.ForkSandbox(
        api.ForkSandboxRequest(name=source.name, keep_snapshot=True), metadata=caller.metadata, timeout=60
    )
    assert stored_chunks(installation) - chunks


async def test_a_bad_sandbox_env_is_invalid_argument(caller):
    import grpc

    for env in ({"A=B": "x"}, {"": "x"}, {"NUL": "a\0b"}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            wanted = sandbox_pb2.Sandbox(env=env)
            await caller.stub.CreateSandbox(api.CreateSandboxRequest(sandbox=wanted), metadata=caller.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
