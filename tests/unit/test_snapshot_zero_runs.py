"""A sparse file (a guest's RAM: mostly never-touched pages) goes to the snapshot store with its holes as lengths,
and is stored exactly as if its zeros had been sent: the same chunks, the same hash, the same bytes back. Real
snapshot service and etcd in this loop."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from microvm.snapshot.v1 import snapshot_pb2, snapshot_pb2_grpc
from services.compute.artifacts import download, extents, upload
from tests.inprocess import InProcessNode

pytestmark = pytest.mark.timeout(60)
CHUNK = 64 << 10


def sparse_file(path: Path, size: int, data_at: list[tuple[int, int]]) -> Path:
    """A file of `size` bytes, holes except random bytes in each (offset, length), plus a data run of zeros (a
    zero page the guest wrote: data, not a hole) right after the first."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_at:
            f.seek(offset)
            f.write(os.urandom(length))
        if data_at:
            offset, length = data_at[0]
            f.seek(offset + length)
            f.write(bytes(min(5000, size - offset - length)))
    return path


LAYOUTS = {
    "all hole": (CHUNK * 3 + 17, []),
    "no hole": (CHUNK * 2 + 5, [(0, CHUNK * 2 + 5)]),
    "unaligned islands": (CHUNK * 9 + 1234, [(100, 7000), (CHUNK * 2 + 4096, CHUNK + 3), (CHUNK * 7 - 10, 4096)]),
    "ends in data": (CHUNK * 4, [(CHUNK * 4 - 4096, 4096)]),
    "empty": (0, []),
}


@pytest.fixture
async def node(etcd_server):
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-zeros-")))
    node.settings["snapshot"] = {"chunk_size_bytes": CHUNK}
    await node.start("snapshot")
    try:
        yield node
    finally:
        await node.stop("snapshot")
        shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture
async def store(node):
    return snapshot_pb2_grpc.SnapshotStoreServiceStub(node.channel(await node.address("snapshot")))


async def put_plain(store, snapshot_id: str, name: str, content: bytes) -> snapshot_pb2.PutArtifactResponse:
    async def requests():
        yield snapshot_pb2.PutArtifactRequest(header=snapshot_pb2.PutArtifactHeader(snapshot_id=snapshot_id, name=name))
        for offset in range(0, len(content), 10_000):
            yield snapshot_pb2.PutArtifactRequest(data=content[offset : offset + 10_000])

    return await store.PutArtifact(requests(), timeout=20)


async def stored_artifact(store, snapshot_id: str, name: str):
    from microvm.types.v1 import snapshot_pb2 as snapshot_types

    record = snapshot_types.SnapshotRecord(id=snapshot_id, source_sandbox="zeros", template="default", vcpus=1)
    committed = (await store.CommitSnapshot(snapshot_pb2.CommitSnapshotRequest(record=record), timeout=10)).record
    return next(a for a in committed.artifacts if a.name == name)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_holes_travel_as_lengths_and_store_as_the_zeros_they_are(store, tmp_path, layout):
    size, islands = LAYOUTS[layout]
    path = sparse_file(tmp_path / "ram", size, islands)
    content = path.read_bytes()
    runs = extents(os.open(path, os.O_RDONLY), size)
    assert sum(length for _, length, _ in runs) == size
    if islands and layout != "no hole":
        assert any(not has_data for _, _, has_data in runs)  # tmp's filesystem keeps holes: the test means it

    tag = layout.replace(" ", "-")
    assert await upload(store, f"snap-sparse-{tag}", "ram", path) == size
    sparse = await stored_artifact(store, f"snap-sparse-{tag}", "ram")
    await put_plain(store, f"snap-plain-{tag}", "ram", content)
    plain = await stored_artifact(store, f"snap-plain-{tag}", "ram")

    assert sparse.size_bytes == plain.size_bytes == size
    assert sparse.sha256 == plain.sha256 == hashlib.sha256(content).hexdigest()
    assert list(sparse.chunk_sha256) == list(plain.chunk_sha256)
    back = tmp_path / "back"
    await download(store, f"snap-sparse-{tag}", "ram", back)
    assert back.read_bytes() == content
    assert (await store.VerifySnapshot(snapshot_pb2.VerifySnapshotRequest(id=f"snap-sparse-{tag}"), timeout=10)).ok


async def test_a_run_of_zeros_that_is_no_length_is_refused(store):
    for bad in (0, -1, (1 << 40) + 1):

        async def requests(bad=bad):
            header = snapshot_pb2.PutArtifactHeader(snapshot_id="snap-bad", name="ram")
            yield snapshot_pb2.PutArtifactRequest(header=header)
            yield snapshot_pb2.PutArtifactRequest(data=b"x")
            yield snapshot_pb2.PutArtifactRequest(zero_bytes=bad)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await store.PutArtifact(requests(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "zero_bytes" in raised.value.details()


async def test_a_corrupt_zero_chunk_is_found_by_verification(node, store, tmp_path):
    path = sparse_file(tmp_path / "ram", CHUNK * 6, [(CHUNK * 2, 100)])
    await upload(store, "snap-zero-verify", "ram", path)
    artifact = await stored_artifact(store, "snap-zero-verify", "ram")
    zero = hashlib.sha256(bytes(CHUNK)).hexdigest()
    assert list(artifact.chunk_sha256).count(zero) == 5
    assert (await store.VerifySnapshot(snapshot_pb2.VerifySnapshotRequest(id="snap-zero-verify"), timeout=10)).ok
    # The one stored all-zero chunk stands for five places in the artifact: damaged, it is reported once.
    chunk_files = list(node.state_dir.glob(f"**/chunks/{zero[:2]}/{zero}"))
    assert len(chunk_files) == 1
    for chunk_file in chunk_files:
        chunk_file.write_bytes(b"\x01" + bytes(CHUNK - 1))
    reply = await store.VerifySnapshot(snapshot_pb2.VerifySnapshotRequest(id="snap-zero-verify"), timeout=10)
    assert not reply.ok and list(reply.bad_chunks) == [zero]
