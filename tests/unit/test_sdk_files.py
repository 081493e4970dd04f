"""The SDK's `sandbox.files` (E2B-like) against an in-process installation (fake VMM): every method, sync and
async, directories both ways as tar streams, watches, and the client's memory staying flat for big files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from microvm_sandbox import AsyncSandbox, ConflictError, FailedPreconditionError, NotFoundError, Sandbox
from microvm_sandbox.aio import AsyncClient
from microvm_sandbox.file_types import FilesystemEventType
from tests.inprocess import tenant_caller
from tests.stack import REPO

pytestmark = pytest.mark.timeout(180)
MIB = 1 << 20


@pytest.fixture(scope="module")
async def installation(installation):
    caller = await tenant_caller(installation, f"sdkfiles-{installation.node}")
    installation.address = await installation.address("gateway")
    installation.key = caller.key
    return installation


@pytest.fixture
async def sandbox(installation):
    client = AsyncClient(installation.address, installation.key)
    sandbox = await AsyncSandbox.create(client=client)
    yield sandbox
    await sandbox.kill()
    await client.close()


async def test_read_write_stat_list_exists_make_dir_remove_rename(sandbox):
    files = sandbox.files
    written = await files.write("/root/app/main.py", "print(42)\n", mode=0o755)
    assert (written.path, written.type, written.size, written.permissions) == (
        "/root/app/main.py",
        "file",
        10,
        "-rwxr-xr-x",
    )
    assert await files.read("/root/app/main.py", format="text") == "print(42)\n"
    assert await files.read("/root/app/main.py", offset=6, length=2) == b"42"
    assert await files.exists("/root/app") and not await files.exists("/root/nope")
    assert (await files.stat("/root/app")).is_dir
    assert await files.make_dir("/root/app/a/b") is True
    assert await files.make_dir("/root/app/a/b") is False
    with pytest.raises(ConflictError):
        await files.make_dir("/root/app/main.py")
    listed = await files.list("/root/app", depth=3)
    assert [e.path for e in listed] == ["/root/app/a", "/root/app/main.py", "/root/app/a/b"]
    moved = await files.rename("/root/app/main.py", "/root/app/a/b/main.py")
    assert moved.path == "/root/app/a/b/main.py"
    await files.write("/root/app/other.py", "")
    with pytest.raises(ConflictError):
        await files.rename("/root/app/other.py", "/root/app/a/b/main.py")
    await files.write("/root/app/log", b"one\n")
    await files.write("/root/app/log", b"two\n", append=True)
    assert await files.read("/root/app/log") == b"one\ntwo\n"
    with pytest.raises(FailedPreconditionError):
        await files.remove("/root/app", recursive=False)
    await files.remove("/root/app")
    with pytest.raises(NotFoundError):
        await files.stat("/root/app")


async def test_write_many_and_directories_both_ways(sandbox, tmp_path):
    done = await sandbox.files.write_many({"/srv/site/index.html": "<h1>hi</h1>", "/srv/site/css/a.css": b"a{}"})
    assert (done.entries, done.bytes) == (2, 14)
    assert await sandbox.files.read("/srv/site/css/a.css") == b"a{}"
    local = tmp_path / "project"
    (local / "pkg" / "empty").mkdir(parents=True)
    (local / "pkg" / "mod.py").write_text("x = 1\n")
    (local / "big.bin").write_bytes(os.urandom(3 * MIB))
    os.symlink("pkg/mod.py", local / "link")
    await sandbox.upload(local, "/root/project")
    assert sorted(e.name for e in await sandbox.files.list("/root/project")) == ["big.bin", "link", "pkg"]
    assert (await sandbox.files.stat("/root/project/link")).symlink_target == "pkg/mod.py"
    back = tmp_path / "back"
    await sandbox.download("/root/project", back)
    assert (back / "pkg" / "mod.py").read_text() == "x = 1\n" and (back / "pkg" / "empty").is_dir()
    assert (back / "big.bin").read_bytes() == (local / "big.bin").read_bytes()
    assert os.readlink(back / "link") == "pkg/mod.py"
    await sandbox.download("/root/project/pkg/mod.py", tmp_path)
    assert (tmp_path / "mod.py").read_text() == "x = 1\n"


async def test_watch_dir_streams_changes_until_stopped(sandbox):
    await sandbox.files.make_dir("/root/watched")
    async with sandbox.files.watch_dir("/root/watched", recursive=True) as events:
        await sandbox.files.write("/root/watched/sub/f.txt", "x")
        seen = []
        while (FilesystemEventType.CREATE, "/root/watched/sub/f.txt") not in seen:
            event = await asyncio.wait_for(events.__anext__(), 10)
            seen.append((event.type, event.path))
    assert seen[0] == (FilesystemEventType.CREATE, "/root/watched/sub")
    assert not any(".mvm-" in path for _, path in seen)  # WriteFile's temporary name never shows
    handle = await sandbox.files.watch_dir("/root/watched")
    await sandbox.files.remove("/root/watched/sub")
    for _ in range(50):
        if events := handle.get_new_events():
            break
        await asyncio.sleep(0.05)
    assert events[0].type == FilesystemEventType.REMOVE and events[0].is_dir
    await handle.stop()


async def test_the_sync_sdk_has_the_same_files(installation, tmp_path):
    def use() -> None:
        from microvm_sandbox import Client

        client = Client(installation.address, installation.key)
        with Sandbox.create(client=client) as sandbox:
            sandbox.files.write("/tmp/s.txt", "sync")
            assert sandbox.files.read("/tmp/s.txt") == b"sync"
            assert b"".join(sandbox.files.read_stream("/tmp/s.txt")) == b"sync"
            assert [e.name for e in sandbox.files.list("/tmp")] == ["s.txt"]
            with sandbox.files.watch_dir("/tmp") as watch:
                sandbox.files.rename("/tmp/s.txt", "/tmp/t.txt")
                event = next(e for e in watch if e.type == FilesystemEventType.RENAME)
                assert (event.type, event.previous_path, event.path) == (
                    FilesystemEventType.RENAME,
                    "/tmp/s.txt",
                    "/tmp/t.txt",
                )
            sandbox.files.write_many({"/tmp/m/a": "a"})
            sandbox.download("/tmp/m", tmp_path / "m")
            assert (tmp_path / "m" / "a").read_text() == "a"
        client.close()

    await asyncio.to_thread(use)


MEMORY_PROBE = textwrap.dedent(
    """
    import asyncio, sys
    from microvm_sandbox.aio import AsyncClient, AsyncSandbox

    async def main():
        address, key, path, back = sys.argv[1:]
        async with AsyncClient(address, key) as client:
            sandbox = await AsyncSandbox.create(client=client)
            try:
                await sandbox.files.upload(path, "/tmp/big.bin")
                await sandbox.files.download("/tmp/big.bin", back)
            finally:
                await sandbox.kill()
        # VmHWM: the peak of this program's own memory (ru_maxrss would include the forking parent's)
        print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)

    asyncio.run(main())
    """
)


async def test_client_memory_stays_flat_for_a_256_mib_file(installation, tmp_path):
    """Upload and download of 256 MiB through the SDK: the client's peak RSS stays under 64 MiB (it holds chunks,
    never the file)."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # sparse-ish: mostly holes, some data
        for index in range(0, 256, 16):
            f.seek(index * MIB)
            f.write(os.urandom(MIB))
        f.truncate(256 * MIB)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "gen" / "python"), str(REPO / "clients/python/src")]))
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MEMORY_PROBE,
        installation.address,
        installation.key,
        str(big),
        str(tmp_path / "back.bin"),
        env=env,
        stdout=subprocess.PIPE,
    )
    output, _ = await probe.communicate()
    assert probe.returncode == 0
    peak_mib = int(output.decode().split()[-1])
    assert os.path.getsize(tmp_path / "back.bin") == 256 * MIB
    print(f"client peak RSS for 256 MiB up and down: {peak_mib} MiB")
    assert peak_mib < 64, f"the client peaked at {peak_mib} MiB"
