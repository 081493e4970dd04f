"""The file API at the public door (gateway -> relay -> agent, fake VMM): what a caller sees of writes into
directories, renames, archives and watches, and the status each failure gets."""

from __future__ import annotations

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture(scope="module")
async def installation(installation):
    installation.tenant = await tenant_caller(installation, f"files-{installation.node}")
    installation.sandbox = (
        await installation.tenant.stub.CreateSandbox(
            api.CreateSandboxRequest(), metadata=installation.tenant.metadata, timeout=60
        )
    ).sandbox
    return installation


def write_requests(sandbox: str, path: str, size: int):
    async def requests():
        yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=sandbox, path=path, make_parents=True))
        for offset in range(0, size, MIB):
            yield api.WriteFileRequest(data=b"x" * min(MIB, size - offset))

    return requests()


@pytest.mark.parametrize("size", [1000, 8 * MIB, 24 * MIB])
async def test_writing_a_file_onto_a_directory_is_failed_precondition_whatever_its_size(installation, size):
    caller, name = installation.tenant, installation.sandbox.name
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await caller.stub.WriteFile(write_requests(name, "/tmp", size), metadata=caller.metadata, timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()


async def test_a_refused_upload_longer_than_two_seconds_still_gets_its_status(installation):
    """`mvm cp` of 8 MB or more onto a directory answered INTERNAL. The agent refused at once; the relay (and the
    gateway) then read what the caller still sent for at most 2 s and ended the call: a caller still sending (a big
    file, a slow link) had a write blocked in flight, and grpc's asyncio client reports that as INTERNAL instead of
    the status (grpc/grpc#36066). Now a refusing server reads until the caller half-closes. Here: 1 GiB sent
    without pause by a plain asyncio client (fails before the fix: INTERNAL "Internal error from Core")."""
    caller, name = installation.tenant, installation.sandbox.name
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await caller.stub.WriteFile(write_requests(name, "/tmp", 1024 * MIB), metadata=caller.metadata, timeout=120)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()


async def test_a_refused_upload_stops_early_for_callers_that_listen(installation):
    """The refusing server says so in its initial metadata (`mvm-refused`): the gateway forwarding to the relay and
    the SDK stop sending and half-close at once, so a doomed 4 GiB upload costs a moment, not 4 GiB."""
    import time

    from microvm_sandbox import FailedPreconditionError
    from microvm_sandbox.aio import AsyncClient, AsyncSandbox

    caller = installation.tenant
    async with AsyncClient(await installation.address("gateway"), caller.key) as client:
        sandbox = await AsyncSandbox.connect(installation.sandbox.name, client=client)
        sent = 0

        async def endless():
            nonlocal sent
            while sent < 4 << 30:
                sent += MIB
                yield b"y" * MIB

        started = time.monotonic()
        with pytest.raises(FailedPreconditionError):
            await sandbox.files.write("/tmp", endless())
        assert time.monotonic() - started < 20 and sent < 256 * MIB, sent


async def test_rename_archives_and_watch_through_the_door(installation):
    import asyncio
    import io
    import tarfile

    caller, name = installation.tenant, installation.sandbox.name
    md = caller.metadata
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("pkg/mod.py")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"x=1"))

    async def requests():
        yield api.UploadArchiveRequest(header=api.UploadArchiveHeader(sandbox=name, path="/tmp/door"))
        yield api.UploadArchiveRequest(data=buffer.getvalue())

    call = caller.stub.WatchDir(api.WatchDirRequest(sandbox=name, path="/tmp", recursive=True), metadata=md)
    events = call.__aiter__()
    assert (await asyncio.wait_for(events.__anext__(), 10)).WhichOneof("event") == "started"
    done = await caller.stub.UploadArchive(requests(), metadata=md, timeout=30)
    assert done.entries == 1 and done.bytes == 3
    moved = await caller.stub.Rename(
        api.RenameRequest(sandbox=name, source="/tmp/door/pkg", destination="/tmp/door/pkg2"), metadata=md, timeout=30
    )
    assert moved.file.path == "/tmp/door/pkg2"
    seen = set()
    while ("FILE_EVENT_TYPE_RENAME", "/tmp/door/pkg2") not in seen:
        event = await asyncio.wait_for(events.__anext__(), 10)
        if event.WhichOneof("event") == "change":
            seen.add((api.FileEventType.Name(event.change.type), event.change.path))
    assert ("FILE_EVENT_TYPE_CREATE", "/tmp/door") in seen
    call.cancel()
    data = b"".join(
        [
            chunk.data
            async for chunk in caller.stub.DownloadArchive(
                api.DownloadArchiveRequest(sandbox=name, path="/tmp/door"), metadata=md, timeout=30
            )
        ]
    )
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names == ["door", "door/pkg2", "door/pkg2/mod.py"]


async def test_the_http_door_uploads_and_downloads_archives_renames_and_watches(installation):
    import io
    import json
    import tarfile

    import aiohttp

    caller, name = installation.tenant, installation.sandbox.name
    base = f"http://{installation.settings['gateway']['http_listen']}/v1/{name}/files"
    headers = {"Authorization": f"Bearer {caller.key}"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("web/index.html")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}:watch", params={"path": "/tmp", "recursive": "true"}) as watch:
            assert "started" in json.loads(await watch.content.readline())
            async with http.post(f"{base}:uploadArchive", params={"path": "/tmp/http"}, data=buffer.getvalue()) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["entries"] == "1"
            change = json.loads(await watch.content.readline())
            assert change["change"]["type"] == "FILE_EVENT_TYPE_CREATE"
        async with http.post(f"{base}:rename", json={"source": "/tmp/http/web", "destination": "/tmp/http/site"}) as r:
            assert r.status == 200 and (await r.json())["file"]["path"] == "/tmp/http/site"
        async with http.get(f"{base}:downloadArchive", params={"path": "/tmp/http/site"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/x-tar"
            back = tarfile.open(fileobj=io.BytesIO(await r.read()))
            assert back.extractfile("site/index.html").read() == b"hello"
        async with http.get(f"{base}:downloadArchive", params={"path": "/tmp/none"}) as r:
            assert r.status == 404 and (await r.json())["code"] == 5
        async with http.post(f"{base}:uploadArchive", params={"path": "/tmp/bad"}, data=b"junk" * 300) as r:
            assert r.status == 400 and (await r.json())["code"] == 3
