"""Bad input at the public door gets a clear status, never INTERNAL/UNKNOWN or a hang, and leaks nothing of
another tenant. A whole installation (fake VMM) in this event loop."""

from __future__ import annotations

import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def installation(installation):
    """The shared installation with two tenants of this module and one sandbox of the first."""
    installation.tenant = await tenant_caller(installation, f"edge-{installation.node}")
    installation.other = await tenant_caller(installation, f"other-{installation.node}")
    installation.sandbox = (
        await installation.tenant.stub.CreateSandbox(
            api.CreateSandboxRequest(), metadata=installation.tenant.metadata, timeout=60
        )
    ).sandbox
    return installation


async def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
        return error.code()
    return grpc.StatusCode.OK


def exec_request(installation, **process):
    return api.ExecRequest(sandbox=installation.sandbox.name, process=api.ProcessConfig(**process))


@pytest.mark.parametrize(
    "process",
    [
        {"argv": ["echo", "a\x00b"]},
        {"argv": ["true"], "env": {"A=B": "1"}},
        {"argv": ["true"], "env": {"": "1"}},
        {"argv": ["true"], "env": {"A": "x\x00y"}},
        {"argv": ["true"], "cwd": "/tmp\x00"},
        {"argv": ["true"], "timeout": {"seconds": -5}},
        {"argv": ["true"], "terminal_size": {"cols": 70000, "rows": 10}, "pty": True},
    ],
)
async def test_bad_exec_requests_are_invalid_argument(installation, process):
    caller = installation.tenant
    code = await status_of(
        lambda: caller.stub.Exec(exec_request(installation, **process), metadata=caller.metadata, timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "path,code",
    [
        ("/tmp/a\x00b", grpc.StatusCode.INVALID_ARGUMENT),
        ("relative", grpc.StatusCode.INVALID_ARGUMENT),
        ("/tmp/afile/below", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_bad_paths_get_clear_statuses(installation, path, code):
    caller = installation.tenant

    async def requests():
        yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=installation.sandbox.name, path="/tmp/afile"))
        yield api.WriteFileRequest(data=b"a file, not a directory")

    await caller.stub.WriteFile(requests(), metadata=caller.metadata, timeout=10)
    got = await status_of(
        lambda: caller.stub.Stat(
            api.StatRequest(sandbox=installation.sandbox.name, path=path), metadata=caller.metadata, timeout=30
        )
    )
    assert got == code


@pytest.mark.parametrize("path", ["/", "//", "/.", "/tmp/..", "/../"])
async def test_removing_the_root_is_refused(installation, path):
    caller = installation.tenant
    got = await status_of(
        lambda: caller.stub.Remove(
            api.RemoveRequest(sandbox=installation.sandbox.name, path=path, recursive=True),
            metadata=caller.metadata,
            timeout=30,
        )
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT


async def test_write_file_with_a_second_header_or_an_oversize_chunk_fails_at_once(installation):
    caller = installation.tenant

    def twice():
        async def requests():
            header = api.WriteFileHeader(sandbox=installation.sandbox.name, path="/tmp/x")
            yield api.WriteFileRequest(header=header)
            yield api.WriteFileRequest(header=header)

        return caller.stub.WriteFile(requests(), metadata=caller.metadata, timeout=10)

    def oversize():
        async def requests():
            yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=installation.sandbox.name, path="/tmp/y"))
            yield api.WriteFileRequest(data=b"x" * ((1 << 20) + 1))

        return caller.stub.WriteFile(requests(), metadata=caller.metadata, timeout=10)

    assert await status_of(twice) == grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(oversize) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("offset,length,mode", [(-1, 0, 0), (0, -1, 0), (1 << 62, 0, 0)])
async def test_bad_file_ranges_are_invalid_argument(installation, offset, length, mode):
    caller = installation.tenant
    got = await status_of(
        lambda: caller.stub.ReadFile(
            api.ReadFileRequest(sandbox=installation.sandbox.name, path="/etc/hostname", offset=offset, length=length),
            metadata=caller.metadata,
            timeout=30,
        )
    )
    assert got in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.OK)


async def test_a_huge_file_mode_is_invalid_argument(installation):
    caller = installation.tenant

    def write():
        async def requests():
            yield api.WriteFileRequest(
                header=api.WriteFileHeader(sandbox=installation.sandbox.name, path="/tmp/m", mode=0o7777777)
            )

        return caller.stub.WriteFile(requests(), metadata=caller.metadata, timeout=10)

    assert await status_of(write) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["sandboxes/abc\n", "sandboxes/ABC", "sandboxes/", "snapshots/x"])
async def test_names_are_matched_whole(installation, name):
    caller = installation.tenant
    got = await status_of(
        lambda: caller.stub.GetSandbox(api.GetSandboxRequest(name=name), metadata=caller.metadata, timeout=10)
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT


async def test_negative_page_sizes_and_timeouts_are_refused(installation):
    caller = installation.tenant
    assert (
        await status_of(
            lambda: caller.stub.ListSandboxes(
                api.ListSandboxesRequest(page_size=-5), metadata=caller.metadata, timeout=10
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await status_of(
            lambda: caller.stub.ListSnapshots(
                api.ListSnapshotsRequest(page_size=-5), metadata=caller.metadata, timeout=10
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    sandbox = sandbox_pb2.Sandbox(timeout={"seconds": -3})
    assert (
        await status_of(
            lambda: caller.stub.CreateSandbox(
                api.CreateSandboxRequest(sandbox=sandbox), metadata=caller.metadata, timeout=30
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_a_token_whose_header_is_a_list_is_unauthenticated(installation):
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    token = f"{b64(b'[1, 2]')}.{b64(b'{}')}.{b64(b'sig')}"
    stub = installation.tenant.stub
    got = await status_of(
        lambda: stub.ListSandboxes(
            api.ListSandboxesRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
    )
    assert got == grpc.StatusCode.UNAUTHENTICATED


async def test_a_request_that_does_not_parse_is_invalid_argument(installation):
    # A string field (GetSandboxRequest.name = 1) holding bytes that are not UTF-8.
    call = installation.tenant.channel.unary_unary(
        "/microvm.sandbox.v1.SandboxService/GetSandbox",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    got = await status_of(lambda: call(b"\x0a\x02\xff\xfe", metadata=installation.tenant.metadata, timeout=10))
    assert got == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_sandbox_whose_guest_lost_its_channel_reads_failed_with_the_reason(installation):
    from microvm.types.v1 import vm_pb2
    from services.common.records import CHANNEL_INCIDENTS, Records
    from services.gateway.records import sandbox_key
    from tests.inprocess import etcd_client_for

    caller = installation.tenant
    sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox
    try:
        # What the node's relay writes when it closes a channel for a protocol violation.
        records = Records(etcd_client_for(installation.etcd_endpoint))
        await records.put(
            CHANNEL_INCIDENTS,
            vm_pb2.ChannelIncident(reason="a flood of frames"),
            sandbox.node,
            sandbox_key(f"edge-{installation.node}", sandbox.name.split("/")[1]),
        )
        got = (
            await caller.stub.GetSandbox(api.GetSandboxRequest(name=sandbox.name), metadata=caller.metadata, timeout=10)
        ).sandbox
        assert got.state == sandbox_pb2.SANDBOX_STATE_FAILED and "a flood of frames" in got.failure_message
        code = await status_of(
            lambda: caller.stub.Exec(
                api.ExecRequest(sandbox=sandbox.name, process=api.ProcessConfig(argv=["true"])),
                metadata=caller.metadata,
                timeout=10,
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await caller.stub.DeleteSandbox(
            api.DeleteSandboxRequest(name=sandbox.name), metadata=caller.metadata, timeout=30
        )


async def test_sandbox_ids_are_per_tenant_and_a_chosen_id_reveals_nobody_else(installation):
    """Two tenants may choose the same id; ALREADY_EXISTS only ever means the caller's own sandbox."""
    mine, theirs = installation.tenant, installation.other
    chosen = "shared-name"

    async def create(caller):
        request = api.CreateSandboxRequest(sandbox_id=chosen)
        return (await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)).sandbox

    first = await create(theirs)
    try:
        second = await create(mine)  # before: ALREADY_EXISTS, telling `mine` that someone has "shared-name"
        assert first.name == second.name == f"sandboxes/{chosen}"
        assert await status_of(lambda: create(mine)) == grpc.StatusCode.ALREADY_EXISTS
        labels = {"owner": "mine"}
        update = api.UpdateSandboxRequest(sandbox=sandbox_pb2.Sandbox(name=second.name, labels=labels))
        await mine.stub.UpdateSandbox(update, metadata=mine.metadata, timeout=10)
        seen = await theirs.stub.GetSandbox(api.GetSandboxRequest(name=first.name), metadata=theirs.metadata)
        assert dict(seen.sandbox.labels) == {}  # each name reaches its own tenant's sandbox
        await mine.stub.DeleteSandbox(api.DeleteSandboxRequest(name=second.name), metadata=mine.metadata, timeout=30)
        still = await theirs.stub.GetSandbox(api.GetSandboxRequest(name=first.name), metadata=theirs.metadata)
        assert still.sandbox.name == first.name
    finally:
        await theirs.stub.DeleteSandbox(api.DeleteSandboxRequest(name=first.name), metadata=theirs.metadata)
