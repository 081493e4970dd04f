"""Rename, archives (tar streams both ways) and directory watches: the relay against the real agent engine on this
host over a unix socket (no VM). Hostile archives are refused member by member and nothing lands outside."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile

import grpc
import pytest

from microvm.agent.v1 import agent_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.settings import RelaySettings
from tests.unit.test_relay_with_host_agent import add_vm, serve_relay, start_agent

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


@pytest.fixture
async def relay(tmp_path, etcd, node_name):
    """The relay of node `node_name`, with one "VM" (`sandboxes/host`): the agent engine on this host."""
    socket_path = str(tmp_path / "agent.sock")
    agent = await start_agent(socket_path)
    await add_vm(etcd, node_name, "host", socket_path)
    async with serve_relay(etcd, node_name, RelaySettings(connect_timeout_seconds=3), tmp_path) as stub:
        stub.agent_pid = agent.pid
        yield stub
    agent.kill()
    agent.wait()


async def status(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def rename(relay, source, destination, overwrite=False):
    return relay.Rename(
        api.RenameRequest(sandbox=relay.name, source=source, destination=destination, overwrite=overwrite)
    )


async def test_rename_moves_files_and_directories_across_directories(relay):
    base = relay.tmp / "r"
    (base / "a" / "tree").mkdir(parents=True)
    (base / "a" / "tree" / "f").write_text("content")
    (base / "b").mkdir()
    moved = await rename(relay, str(base / "a" / "tree"), str(base / "b" / "tree2"))
    assert moved.file.path == str(base / "b" / "tree2")
    assert (base / "b" / "tree2" / "f").read_text() == "content" and not (base / "a" / "tree").exists()
    moved = await rename(relay, str(base / "b" / "tree2" / "f"), str(base / "a" / "g"))
    assert moved.file.size == len("content") and (base / "a" / "g").read_text() == "content"


async def test_rename_statuses(relay):
    base = relay.tmp / "rs"
    (base / "dir" / "sub").mkdir(parents=True)
    (base / "one").write_text("1")
    (base / "two").write_text("2")
    cases = [
        (str(base / "missing"), str(base / "x"), False, grpc.StatusCode.NOT_FOUND),
        (str(base / "one"), str(base / "no-dir" / "x"), False, grpc.StatusCode.NOT_FOUND),
        (str(base / "one"), str(base / "two"), False, grpc.StatusCode.ALREADY_EXISTS),
        (str(base / "dir"), str(base / "dir" / "sub" / "inside"), False, grpc.StatusCode.INVALID_ARGUMENT),
        (str(base / "dir"), str(base / "one"), True, grpc.StatusCode.FAILED_PRECONDITION),  # ENOTDIR
        (str(base / "one"), str(base / "dir"), True, grpc.StatusCode.FAILED_PRECONDITION),  # EISDIR
        ("/", str(base / "root"), False, grpc.StatusCode.INVALID_ARGUMENT),
        (str(base / "one"), "relative", False, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for source, destination, overwrite, expected in cases:
        assert await status(lambda s=source, d=destination, o=overwrite: rename(relay, s, d, o)) == expected, (
            source,
            destination,
        )
    assert (base / "two").read_text() == "2"
    await rename(relay, str(base / "one"), str(base / "two"), overwrite=True)
    assert (base / "two").read_text() == "1" and not (base / "one").exists()


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, kind=tarfile.REGTYPE, data: bytes | None = None, linkname: str = "", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, mode, 1_700_000_000
    return info, (data if kind == tarfile.REGTYPE else None)


def upload(relay, path: str, archive: bytes, chunk: int = MIB):
    async def requests():
        yield api.UploadArchiveRequest(header=api.UploadArchiveHeader(sandbox=relay.name, path=path))
        for offset in range(0, len(archive), chunk):
            yield api.UploadArchiveRequest(data=archive[offset : offset + chunk])

    return relay.UploadArchive(requests())


async def download(relay, path: str) -> bytes:
    return b"".join(
        [r.data async for r in relay.DownloadArchive(api.DownloadArchiveRequest(sandbox=relay.name, path=path))]
    )


async def test_an_archive_uploads_into_a_directory_and_downloads_back(relay):
    big = os.urandom(3 * MIB + 5)
    archive = tar_of(
        [
            member("proj", tarfile.DIRTYPE, mode=0o750),
            member("proj/src/main.py", data=b"print(42)\n", mode=0o755),
            member("proj/big.bin", data=big),
            member("proj/link", tarfile.SYMTYPE, linkname="src/main.py"),
            member("proj/hard", tarfile.LNKTYPE, linkname="proj/big.bin"),
            member("proj/abs-link", tarfile.SYMTYPE, linkname="/etc/passwd"),  # stored, never followed
        ]
    )
    target = relay.tmp / "up" / "here"
    done = await upload(relay, str(target), archive, chunk=300_000)
    assert (done.entries, done.bytes, done.sha256) == (6, len(big) + 10, hashlib.sha256(archive).hexdigest())
    assert (target / "proj" / "src" / "main.py").read_bytes() == b"print(42)\n"
    assert os.stat(target / "proj" / "src" / "main.py").st_mode & 0o777 == 0o755
    assert os.stat(target / "proj").st_mode & 0o777 == 0o750
    assert os.readlink(target / "proj" / "link") == "src/main.py"
    assert os.stat(target / "proj" / "hard").st_ino == os.stat(target / "proj" / "big.bin").st_ino
    assert os.stat(target / "proj" / "big.bin").st_mtime == 1_700_000_000

    back = tarfile.open(fileobj=io.BytesIO(await download(relay, str(target / "proj"))), mode="r:")
    names = {m.name: m for m in back.getmembers()}
    assert {"proj", "proj/src", "proj/src/main.py", "proj/big.bin", "proj/link", "proj/abs-link"} <= set(names)
    assert names["proj/link"].issym() and names["proj/link"].linkname == "src/main.py"
    blob = next(n for n in ("proj/big.bin", "proj/hard") if names[n].isreg())
    assert back.extractfile(names[blob]).read() == big
    single = tarfile.open(fileobj=io.BytesIO(await download(relay, str(target / "proj" / "src" / "main.py"))))
    assert [m.name for m in single.getmembers()] == ["main.py"]


async def test_upload_replaces_files_and_merges_directories(relay):
    target = relay.tmp / "merge"
    (target / "d").mkdir(parents=True)
    (target / "d" / "keep").write_text("kept")
    (target / "d" / "old").write_text("old")
    await upload(relay, str(target), tar_of([member("d/old", data=b"new"), member("d/added", data=b"+")]))
    assert sorted(os.listdir(target / "d")) == ["added", "keep", "old"]
    assert (target / "d" / "old").read_text() == "new"


HOSTILE = {
    "absolute-name": [member("/abs-evil", data=b"x")],
    "dot-dot": [member("a/../../dotdot-evil", data=b"x")],
    "write-through-symlink": [
        member("out", tarfile.SYMTYPE, linkname="../outside"),
        member("out/symlink-evil", data=b"x"),
    ],
    "write-through-absolute-symlink": [
        member("abs", tarfile.SYMTYPE, linkname="/"),
        member("abs/tmp/abs-symlink-evil", data=b"x"),
    ],
    "character-device": [member("null", tarfile.CHRTYPE)],
    "block-device": [member("disk", tarfile.BLKTYPE)],
    "fifo": [member("pipe", tarfile.FIFOTYPE)],
    "hard-link-outside": [member("h", tarfile.LNKTYPE, linkname="../outside/secret")],
    "long-component": [member("a" * 256, data=b"x")],
    "long-name": [member("/".join(["d" * 200] * 21), data=b"x")],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_archive_is_refused_and_writes_nothing_outside(relay, name):
    outside = relay.tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_text("secret")
    target = relay.tmp / "jail" / "t"
    target.mkdir(parents=True)
    before = sorted(os.listdir(relay.tmp))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await upload(relay, str(target), tar_of(HOSTILE[name]))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failure.value.details()
    assert "UNSAFE_ARCHIVE_MEMBER" in str(failure.value.trailing_metadata())
    assert sorted(os.listdir(relay.tmp)) == before  # nothing beside the jail
    assert os.listdir(outside) == ["secret"] and not os.path.exists("/abs-evil")
    assert not os.path.exists("/tmp/abs-symlink-evil")


async def test_what_is_not_an_archive_is_invalid_argument(relay):
    code = await status(lambda: upload(relay, str(relay.tmp / "junk"), b"this is not a tar archive" * 100))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code = await status(lambda: download(relay, str(relay.tmp / "no-such")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_an_archive_larger_than_any_buffer_streams_through(relay):
    """64 MiB of archive, produced while it is sent: the agent's pipe and window bound what waits anywhere."""
    size = 64 * MIB
    reader, writer = os.pipe()

    def produce():
        with os.fdopen(writer, "wb") as sink, tarfile.open(fileobj=sink, mode="w|") as tar:
            info = tarfile.TarInfo("big/zeros")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))

    producer = asyncio.ensure_future(asyncio.to_thread(produce))

    async def requests():
        yield api.UploadArchiveRequest(header=api.UploadArchiveHeader(sandbox=relay.name, path=str(relay.tmp / "s")))
        with os.fdopen(reader, "rb") as source:
            while data := await asyncio.to_thread(source.read, MIB):
                yield api.UploadArchiveRequest(data=data)

    done = await relay.UploadArchive(requests())
    await producer
    assert done.bytes == size and os.path.getsize(relay.tmp / "s" / "big" / "zeros") == size
    received = 0
    async for chunk in relay.DownloadArchive(api.DownloadArchiveRequest(sandbox=relay.name, path=str(relay.tmp / "s"))):
        assert len(chunk.data) <= MIB
        received += len(chunk.data)
    assert received > size


async def next_changes(events, count: int, timeout: float = 5.0) -> list:
    changes = []
    while len(changes) < count:
        response = await asyncio.wait_for(events.__anext__(), timeout)
        if response.WhichOneof("event") == "change":
            changes.append(response.change)
    return changes


def kinds(changes) -> list[tuple[str, str]]:
    return [
        (api.FileEventType.Name(c.type).removeprefix("FILE_EVENT_TYPE_"), os.path.basename(c.path)) for c in changes
    ]


async def test_watch_reports_create_write_rename_chmod_and_remove(relay):
    directory = relay.tmp / "w"
    directory.mkdir()
    call = relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(directory)))
    events = call.__aiter__()
    first = await asyncio.wait_for(events.__anext__(), 5)
    assert first.WhichOneof("event") == "started" and first.started.directories == 1
    (directory / "a").write_text("x")  # create, write
    await asyncio.sleep(0.05)
    os.rename(directory / "a", directory / "b")
    os.chmod(directory / "b", 0o600)
    os.unlink(directory / "b")
    changes = await next_changes(events, 5)
    assert kinds(changes) == [("CREATE", "a"), ("WRITE", "a"), ("RENAME", "b"), ("CHMOD", "b"), ("REMOVE", "b")]
    assert changes[2].previous_path == str(directory / "a")
    call.cancel()


async def test_recursive_watch_follows_directories_created_later(relay):
    directory = relay.tmp / "wr"
    (directory / "old").mkdir(parents=True)
    call = relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(directory), recursive=True))
    events = call.__aiter__()
    assert (await asyncio.wait_for(events.__anext__(), 5)).started.directories == 2
    (directory / "old" / "f").write_bytes(b"")
    (directory / "new" / "deeper").mkdir(parents=True)
    await asyncio.sleep(0.2)
    (directory / "new" / "deeper" / "g").write_bytes(b"")
    wanted = {
        ("FILE_EVENT_TYPE_CREATE", str(directory / "old" / "f")),
        ("FILE_EVENT_TYPE_CREATE", str(directory / "new")),
        ("FILE_EVENT_TYPE_CREATE", str(directory / "new" / "deeper" / "g")),
    }
    # A directory made while its parent's new watch scans it can be reported twice (by the scan and by its own
    # event): read until every wanted event came, not a fixed count.
    paths: set = set()
    while not wanted <= paths:
        change = (await next_changes(events, 1))[0]
        paths.add((api.FileEventType.Name(change.type), change.path))
    assert wanted <= paths
    call.cancel()


async def test_a_cancelled_watch_ends_in_the_guest_too(relay):
    directory = relay.tmp / "wc"
    directory.mkdir()
    agent_pid = relay.agent_pid
    await relay.Stat(api.StatRequest(sandbox=relay.name, path=str(directory)))  # the channel is open
    descriptors = len(os.listdir(f"/proc/{agent_pid}/fd"))
    for _ in range(5):
        call = relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(directory), recursive=True))
        await asyncio.wait_for(call.__aiter__().__anext__(), 5)
        call.cancel()
    for _ in range(50):
        if len(os.listdir(f"/proc/{agent_pid}/fd")) <= descriptors:
            break
        await asyncio.sleep(0.1)
    assert len(os.listdir(f"/proc/{agent_pid}/fd")) <= descriptors


async def test_watch_of_a_missing_or_non_directory_path_fails(relay):
    (relay.tmp / "plain").write_text("x")
    code = await status(lambda: relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(relay.tmp / "nope"))))
    assert code == grpc.StatusCode.NOT_FOUND
    code = await status(lambda: relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(relay.tmp / "plain"))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_ends_when_its_directory_is_removed(relay):
    directory = relay.tmp / "gone"
    directory.mkdir()
    call = relay.WatchDir(api.WatchDirRequest(sandbox=relay.name, path=str(directory)))
    events = call.__aiter__()
    await asyncio.wait_for(events.__anext__(), 5)
    directory.rmdir()
    rest = [r async for r in events]
    assert [kinds([r.change]) for r in rest if r.WhichOneof("event") == "change"][-1] == [("REMOVE", "gone")]


def test_the_guest_drops_changes_beyond_its_bound_and_says_overflow():
    """The agent's queue of changes the host has not taken is bounded: beyond it, an overflow flag, never growth."""
    from microvm_agent import watch

    class Quiet:
        initial_window = 1 << 20

    watcher = watch.DirectoryWatch(Quiet(), 1)
    for index in range(watch.MAX_PENDING + 500):
        watcher.queue(agent_pb2.WATCH_EVENT_TYPE_CREATE, f"/f{index}", False)
    assert len(watcher.pending) == watch.MAX_PENDING and watcher.overflow
