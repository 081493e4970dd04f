"""A VM's serial console on disk stays within `compute.console_log_max_bytes * (console_log_keep + 1)` however much
the guest writes, whether or not compute runs; reads seek to what they need (a tail or a range) and stream it.

The fake VMM's guest is a host process whose console is its agent's stdout, so a guest process reaches it through
/proc/<agent pid>/fd/1 (in a real guest: /dev/console)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from microvm.compute.v1 import compute_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import vm_pb2
from services.common.errors import InvalidArgument
from services.common.records import VMS, Records
from services.compute.console import ConsoleLog, select
from tests.inprocess import tenant_caller
from tests.unit.test_compute_node import start_node, until

pytestmark = pytest.mark.timeout(120)
CAP, KEEP = 128 << 10, 1
TO_CONSOLE = ">> /proc/$PPID/fd/1"  # the agent's stdout is the fake guest's serial console


# --- the log on disk ----------------------------------------------------------------------------------------
def on_disk(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.glob("console.log*")}


async def read_log(log: ConsoleLog, **selection) -> tuple[int, bytes]:
    first, data = None, b""
    async for offset, chunk in log.stream(select(**selection)):
        assert first is None or offset == first + len(data), "chunks follow each other"
        first = offset if first is None else first
        data += chunk
    return (first or 0), data


async def test_the_log_rotates_within_its_cap_and_keeps_the_newest_bytes(tmp_path):
    log = ConsoleLog(tmp_path, max_bytes=64 << 10, keep=1)
    written = b"".join(b"%08d\n" % n for n in range(60_000))  # 540 000 bytes, each line its own
    for start in range(0, len(written), 7_000):
        log.append(written[start : start + 7_000])
    sizes = on_disk(tmp_path)
    assert set(sizes) == {"console.log", "console.log.1"} and max(sizes.values()) <= 64 << 10
    first, end = log.window()
    assert end == len(written) and end - first == sum(sizes.values())
    assert log.tail(18) == written[-18:]
    assert await read_log(log, tail_bytes=100_000) == (first, written[first:])
    assert await read_log(log, offset=first - 100) == (first, written[first:])  # rotated away: starts at what is kept
    assert await read_log(log, offset=end - 20, length=9) == (end - 20, written[-20:-11])
    assert await read_log(log, offset=end) == (0, b"")  # nothing new yet


async def test_offsets_survive_a_new_reader_and_a_rotation_cut_short(tmp_path):
    log = ConsoleLog(tmp_path, max_bytes=1000, keep=2)
    log.append(b"a" * 2500)
    log.close()
    assert on_disk(tmp_path) == {"console.log.2": 1000, "console.log.1": 1000, "console.log": 500}
    # compute stopped between moving console.log aside and making the next one
    (tmp_path / "console.log.2").unlink()
    os.replace(tmp_path / "console.log.1", tmp_path / "console.log.2")
    os.replace(tmp_path / "console.log", tmp_path / "console.log.1")
    again = ConsoleLog(tmp_path, max_bytes=1000, keep=2)
    assert again.window() == (1000, 2500)
    again.append(b"b" * 10)
    assert again.window() == (1000, 2510)
    assert await read_log(again, offset=2495) == (2495, b"aaaaabbbbbbbbbb")
    reader = ConsoleLog(tmp_path, max_bytes=1000, keep=2)  # another instance, as the next compute's
    assert reader.window() == (1000, 2510)


async def test_a_log_that_keeps_no_old_file_still_counts_offsets(tmp_path):
    log = ConsoleLog(tmp_path, max_bytes=4096, keep=0)
    for _ in range(10):
        log.append(b"z" * 1500)
    assert on_disk(tmp_path) == {"console.log": 15000 - 3 * 4096}
    assert log.window() == (3 * 4096, 15000)
    log.close()
    os.replace(tmp_path / "console.log", tmp_path / "console.log.1")  # a rotation cut short
    again = ConsoleLog(tmp_path, max_bytes=4096, keep=0)
    assert again.window() == (15000, 15000) and on_disk(tmp_path) == {}, "a file beyond `keep` goes"
    again.append(b"y")
    assert await read_log(again) == (15000, b"y")


@pytest.mark.parametrize(
    "settings", [{"console_log_max_bytes": 100}, {"console_log_keep": -1}, {"console_log_keep": 17}]
)
def test_console_limits_out_of_bounds_are_refused_at_start(settings):
    from services.common.config import ConfigError
    from services.common.settings import ComputeSettings

    with pytest.raises(ConfigError, match="console_log"):
        ComputeSettings(**settings).validate()


@pytest.mark.parametrize(
    "tail_bytes, offset, length",
    [(-1, 0, 0), (0, -5, 0), (0, 0, -1), (5, 10, 0), (5, 0, 10), (0, 1 << 62, 0)],
)
def test_bad_reads_are_invalid_arguments(tail_bytes, offset, length):
    with pytest.raises(InvalidArgument):
        select(tail_bytes, offset, length)


# --- compute with the fake VMM --------------------------------------------------------------------------------
@pytest.fixture
async def node(tmp_path, etcd_server, etcd):
    under_test = await start_node(
        tmp_path, etcd_server, etcd, warm_pool_size=0, console_log_max_bytes=CAP, console_log_keep=KEEP
    )
    yield under_test
    await under_test.node.stop_all()


async def directory_of(node, vm_id: str) -> Path:
    return Path((await Records(node.etcd).get(VMS, node.node.node, vm_id)).message.directory)


async def read_console(node, vm_id: str, **selection) -> tuple[int, bytes]:
    """(offset of the first byte, bytes) of one ReadConsole call; the chunks must be contiguous."""
    first, data = None, b""
    async for chunk in node.compute.ReadConsole(compute_pb2.ReadConsoleRequest(vm_id=vm_id, **selection), timeout=30):
        assert first is None or chunk.offset == first + len(data), "chunks follow each other"
        assert len(chunk.data) <= 64 << 10
        first = chunk.offset if first is None else first
        data += chunk.data
    return (first or 0), data


async def console_ends_with(node, vm_id: str, marker: bytes):
    async def ended():
        offset, data = await read_console(node, vm_id, tail_bytes=len(marker))
        return (offset, data) if data == marker else None

    return await until(ended)


async def test_a_guest_flooding_its_console_never_grows_the_log_past_its_cap(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="flood-1"), timeout=30)
    directory = await directory_of(node, "flood-1")
    flood = f"head -c 3000000 /dev/zero | tr '\\0' x {TO_CONSOLE}; echo END-OF-FLOOD {TO_CONSOLE}"
    assert (await node.exec("flood-1", ["sh", "-c", flood]))[1] == 0

    async def flood_logged():
        try:
            return (directory / "console.log").read_bytes().endswith(b"END-OF-FLOOD\n")
        except FileNotFoundError:
            return False

    await until(flood_logged)
    sizes = on_disk(directory)
    assert sum(sizes.values()) <= CAP * (KEEP + 1), sizes
    assert max(sizes.values()) <= CAP and set(sizes) <= {"console.log", "console.log.1"}

    end_marker, tail = await console_ends_with(node, "flood-1", b"END-OF-FLOOD\n")
    assert end_marker >= 3_000_000, "offsets count every byte the guest wrote, rotated away or not"
    assert await read_console(node, "flood-1", offset=end_marker - 5, length=8) == (end_marker - 5, b"xxxxxEND")
    first, everything = await read_console(node, "flood-1")
    assert first > 0 and first + len(everything) == end_marker + len(tail)
    assert len(everything) == sum(sizes.values())


@pytest.mark.parametrize(
    "selection, code",
    [
        ({"tail_bytes": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"offset": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"length": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"tail_bytes": 10, "offset": 3}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"offset": 1 << 40}, grpc.StatusCode.OUT_OF_RANGE),
    ],
)
async def test_bad_console_reads_get_clear_statuses(node, selection, code):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="range-1"), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await read_console(node, "range-1", **selection)
    assert failure.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await read_console(node, "no-such-vm", tail_bytes=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_console_is_drained_again_after_a_compute_restart(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="keep-console"), timeout=30)
    await node.exec("keep-console", ["sh", "-c", f"echo before-restart {TO_CONSOLE}"])
    before, _ = await console_ends_with(node, "keep-console", b"before-restart\n")
    await node.node.stop("compute")
    await node.exec("keep-console", ["sh", "-c", f"head -c 300000 /dev/zero {TO_CONSOLE}"])  # dropped, not blocked
    await node.node.start("compute")
    await node.connect()

    async def drained_again():
        # What the guest writes before the new compute has connected is dropped by design: write until it shows.
        await node.exec("keep-console", ["sh", "-c", f"echo after-restart {TO_CONSOLE}"])
        offset, data = await read_console(node, "keep-console", tail_bytes=14)
        return offset if data == b"after-restart\n" else None

    after = await until(drained_again)
    assert after > before and sum(on_disk(await directory_of(node, "keep-console")).values()) <= CAP * (KEEP + 1)
    assert b"before-restart\n" in (await read_console(node, "keep-console"))[1]


async def test_a_vm_whose_vmm_dies_keeps_its_last_console_words(node):
    await node.compute.CreateVm(compute_pb2.CreateVmRequest(vm_id="dies-1"), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError):  # its agent goes with it
        await node.exec("dies-1", ["sh", "-c", f"echo last-words {TO_CONSOLE}; kill -9 $PPID; sleep 5"])

    async def failed():
        vm = await node.vm("dies-1")
        return vm if vm.state == vm_pb2.VM_STATE_FAILED else None

    assert "last-words" in (await until(failed)).failure_message
    assert (await read_console(node, "dies-1", tail_bytes=11))[1] == b"last-words\n"


# --- the public API -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def public(installation):
    installation.tenant = await tenant_caller(installation, f"console-{installation.node}")
    installation.other = await tenant_caller(installation, f"console-other-{installation.node}")
    caller = installation.tenant
    installation.sandbox = (
        await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
    ).sandbox
    async for _ in caller.stub.Exec(
        api.ExecRequest(
            sandbox=installation.sandbox.name,
            process=api.ProcessConfig(argv=["sh", "-c", f"echo public-marker {TO_CONSOLE}"]),
        ),
        metadata=caller.metadata,
        timeout=30,
    ):
        pass
    return installation


async def read_public(caller, name: str, **selection) -> bytes:
    request = api.ReadConsoleLogRequest(sandbox=name, **selection)
    return b"".join([c.data async for c in caller.stub.ReadConsoleLog(request, metadata=caller.metadata, timeout=30)])


async def test_read_console_log_is_served_to_its_tenant_only(public):
    async def logged():
        return await read_public(public.tenant, public.sandbox.name, tail_bytes=14) == b"public-marker\n"

    await until(logged)
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await read_public(public.other, public.sandbox.name, tail_bytes=14)
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await read_public(public.tenant, public.sandbox.name, tail_bytes=3, length=4)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_sdk_http_and_cli_read_the_console(public, monkeypatch, capsysbinary):
    import aiohttp

    from microvm_sandbox.aio import AsyncClient, AsyncSandbox
    from mvm_cli.main import main

    address = await public.address("gateway")
    client = AsyncClient(address, public.tenant.key)
    try:
        sandbox = await AsyncSandbox.connect(public.sandbox.name, client)
        output = await sandbox.read_console_log(tail_bytes=14)
        assert output.data == b"public-marker\n" and output.end == output.offset + 14
        assert (await sandbox.read_console_log(offset=output.offset, length=6)).data == b"public"
    finally:
        await client.close()

    http = public.settings["gateway"]["http_listen"]
    sandbox_id = public.sandbox.name.removeprefix("sandboxes/")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {public.tenant.key}"}) as session:
        async with session.get(f"http://{http}/v1/sandboxes/{sandbox_id}/console:read?tailBytes=14") as response:
            assert response.status == 200 and await response.read() == b"public-marker\n"

    monkeypatch.setenv("MVM_API_KEY", public.tenant.key)
    await asyncio.to_thread(main, ["--gateway", address, "console", sandbox_id, "--tail", "14"])
    printed = capsysbinary.readouterr().out.splitlines()  # with the in-process services' log lines
    assert b"public-marker" in printed
