"""E2B `files` through envd (services/gateway/e2b/envd.py): the unmodified E2B SDK against a real in-process
installation (fake VMM), envd mounted on its own: read/write, list with depth, exists, get_info, make_dir, remove,
rename, watch_dir (streamed and polled), a large file streamed both ways."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
from e2b import FileType
from e2b.exceptions import NotFoundException
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from e2b_envd import filesystem_pb2 as fs
from e2b_envd import process_pb2 as proc

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.e2b_envd import SANDBOX_ENV, e2b_sandbox, envd_app
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"envd-files-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def envd(caller):
    request = api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(env=SANDBOX_ENV))
    created = await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)
    sandbox_id = created.sandbox.name.split("/", 1)[1]
    async with envd_app(caller, sandbox_id) as url:
        yield url, e2b_sandbox(url, sandbox_id)


@pytest.fixture
def sandbox(envd):
    return envd[1]


@pytest.fixture
def base() -> str:
    return f"/tmp/e2b-{uuid.uuid4().hex[:8]}"


async def test_write_and_read_text_and_bytes(sandbox, base):
    info = await sandbox.files.write(f"{base}/deep/hello.txt", "hello world")
    assert (info.path, info.name) == (f"{base}/deep/hello.txt", "hello.txt")
    assert await sandbox.files.read(f"{base}/deep/hello.txt") == "hello world"
    await sandbox.files.write(f"{base}/blob", bytes(range(256)))
    assert await sandbox.files.read(f"{base}/blob", format="bytes") == bytes(range(256))
    written = await sandbox.files.write_files([{"path": f"{base}/a", "data": "A"}, {"path": f"{base}/b", "data": b"B"}])
    assert sorted(w.path for w in written) == [f"{base}/a", f"{base}/b"]
    assert await sandbox.files.read(f"{base}/b") == "B"


async def test_a_relative_path_is_in_the_users_home(sandbox):
    name = f"e2b-relative-{uuid.uuid4().hex[:6]}.txt"
    await sandbox.files.write(name, "at home")
    assert (await sandbox.files.get_info(f"/root/{name}")).path == f"/root/{name}"
    await sandbox.files.remove(name)


async def test_read_of_a_missing_file_is_not_found(sandbox, base):
    with pytest.raises(NotFoundException):
        await sandbox.files.read(f"{base}/missing")
    with pytest.raises(NotFoundException):
        await sandbox.files.get_info(f"{base}/missing")


async def test_list_with_depth_exists_info_make_dir_rename_remove(sandbox, base):
    assert await sandbox.files.make_dir(f"{base}/one/two") is True
    assert await sandbox.files.make_dir(f"{base}/one/two") is False  # already there: envd's already_exists
    await sandbox.files.write(f"{base}/one/two/three.txt", "3")
    await sandbox.files.write(f"{base}/top.txt", "top")
    shallow = await sandbox.files.list(base)
    assert sorted(e.name for e in shallow) == ["one", "top.txt"]
    deep = await sandbox.files.list(base, depth=3)
    assert sorted(e.path for e in deep) == sorted(
        [f"{base}/one", f"{base}/one/two", f"{base}/one/two/three.txt", f"{base}/top.txt"]
    )
    info = await sandbox.files.get_info(f"{base}/top.txt")
    assert (info.type, info.size, info.permissions, info.owner) == (FileType.FILE, 3, "-rw-r--r--", "root")
    assert (await sandbox.files.get_info(f"{base}/one")).type == FileType.DIR
    assert await sandbox.files.exists(f"{base}/top.txt") and not await sandbox.files.exists(f"{base}/nope")
    moved = await sandbox.files.rename(f"{base}/top.txt", f"{base}/moved.txt")
    assert moved.path == f"{base}/moved.txt" and not await sandbox.files.exists(f"{base}/top.txt")
    await sandbox.files.remove(f"{base}/one")  # a directory with its contents, as envd removes
    assert not await sandbox.files.exists(f"{base}/one")


async def test_a_large_file_streams_both_ways(sandbox, base):
    data = hashlib.sha256(b"seed").digest() * (24 * MIB // 32)  # 24 MiB, beyond any one message
    await sandbox.files.write(f"{base}/large.bin", data)
    assert (await sandbox.files.get_info(f"{base}/large.bin")).size == len(data)
    read = await sandbox.files.read(f"{base}/large.bin", format="bytes")
    assert hashlib.sha256(read).digest() == hashlib.sha256(data).digest()


async def test_watch_dir_reports_creates_writes_and_removes(sandbox, base):
    await sandbox.files.make_dir(base)
    events = []
    handle = await sandbox.files.watch_dir(base, on_event=events.append, include_entry=True)
    try:
        await sandbox.files.write(f"{base}/watched.txt", "x")
        await sandbox.files.remove(f"{base}/watched.txt")
        for _ in range(400):
            if any(e.type == FilesystemEventType.REMOVE for e in events):
                break
            await asyncio.sleep(0.05)
        kinds = {e.type for e in events if e.name == "watched.txt"}
        assert FilesystemEventType.CREATE in kinds and FilesystemEventType.REMOVE in kinds
    finally:
        await handle.stop()


async def test_polled_watchers_keep_events_until_asked_and_unknown_ones_are_not_found(envd, base):
    from connectrpc.errors import ConnectError
    from e2b.envd.client_shared import ENVD_JSON_CODEC
    from e2b.envd.filesystem.filesystem_connect import FilesystemClient

    url, sandbox = envd
    await sandbox.files.make_dir(base)
    client = FilesystemClient(url, codec=ENVD_JSON_CODEC)
    from e2b.envd.filesystem import filesystem_pb as sdk_fs

    created = await client.create_watcher(sdk_fs.CreateWatcherRequest(path=base))
    await sandbox.files.write(f"{base}/polled.txt", "p")
    names = []
    for _ in range(400):
        reply = await client.get_watcher_events(sdk_fs.GetWatcherEventsRequest(watcher_id=created.watcher_id))
        names += [e.name for e in reply.events]
        if "polled.txt" in names:
            break
        await asyncio.sleep(0.05)
    assert "polled.txt" in names
    await client.remove_watcher(sdk_fs.RemoveWatcherRequest(watcher_id=created.watcher_id))
    with pytest.raises(ConnectError) as raised:
        await client.get_watcher_events(sdk_fs.GetWatcherEventsRequest(watcher_id=created.watcher_id))
    assert raised.value.code.value == "not_found"


def test_generated_messages_are_the_sdks_wire():
    """Our compiled copy of E2B's protos and the SDK's own agree on the wire (a field renumbered would not)."""
    from e2b.envd.process import process_pb as sdk_proc

    ours = proc.StartRequest(process=proc.ProcessConfig(cmd="/bin/bash", args=["-c", "x"], cwd="/w"), tag="t")
    theirs = sdk_proc.StartRequest.from_binary(ours.SerializeToString())
    assert (theirs.process.cmd, list(theirs.process.args), theirs.process.cwd, theirs.tag) == (
        "/bin/bash",
        ["-c", "x"],
        "/w",
        "t",
    )
    assert fs.EntryInfo(name="n").SerializeToString() == b"\n\x01n"


async def test_polled_watchers_are_bounded_and_expire_unpolled(envd, base, monkeypatch):
    import aiohttp

    from services.gateway.e2b import envd_watchers

    url, sandbox = envd
    await sandbox.files.make_dir(base)
    monkeypatch.setattr(envd_watchers, "MAX_PER_SANDBOX", 2)
    async with aiohttp.ClientSession() as http:

        async def create() -> tuple[int, dict]:
            async with http.post(f"{url}/filesystem.Filesystem/CreateWatcher", json={"path": base}) as r:
                return r.status, await r.json()

        first, second = (await create())[1]["watcherId"], (await create())[1]["watcherId"]
        status, refused = await create()
        assert (status, refused["code"]) == (429, "resource_exhausted")
        monkeypatch.setattr(envd_watchers, "IDLE_SECONDS", 0.0)  # nobody polled them "for too long": both expire
        status, _ = await create()
        assert status == 200
        for watcher_id in (first, second):
            async with http.post(f"{url}/filesystem.Filesystem/GetWatcherEvents", json={"watcherId": watcher_id}) as r:
                assert r.status == 404
