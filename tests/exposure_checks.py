"""What tests/unit/test_exposed_ports.py does inside its network namespace (see tests/netns.py `run_in`).

`observe()` starts a one-node installation (fake VMM, networking on: bridge, TAPs, nftables), exposes ports of a
sandbox the ways a caller may and may not, takes them back, and returns what it saw as plain values. The fake
VMM's guest is a host process: its address is put on the namespace's loopback and listeners there play the
program in the guest, answering `guest <id>:<guest port>`. Clients connect only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from microvm.network.v1 import network_pb2, network_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.errors import error_info
from services.common.records import ATTACHMENTS, Records
from services.gateway.records import sandbox_key
from tests.etcd import LocalEtcd
from tests.inprocess import InProcessNode, etcd_client_for, fake_image_root, start_installation, tenant_caller

HOST_ADDRESS = "192.0.2.10"  # the namespace's own non-loopback address (its "public" one)
GUEST_PORT, OTHER_GUEST_PORT = 8000, 8001
LOW, HIGH = 30000, 32767  # the documented default range
ASKED = LOW + 1000
RECONCILE_SECONDS = 0.5


class NetworkedNode(InProcessNode):
    def common(self):
        return dataclasses.replace(super().common(), networking=True)


async def outcome(call) -> str:
    """`OK host:port` for a mapping made (`OK` for another answer), else the status and its reason."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return f"{error.code().name} {info.reason if info else ''}".strip()
    except Exception as exc:  # noqa: BLE001 - reported, so a test names what went wrong
        return f"ERROR {exc!r}"
    return f"OK {reply.port.host_address}:{reply.port.host_port}" if hasattr(reply, "port") else "OK"


async def through(port: int) -> str:
    """What a client of 127.0.0.1:`port` receives, or `refused`."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except OSError:
        return "refused"
    try:
        return (await asyncio.wait_for(reader.read(-1), 10)).decode()
    finally:
        writer.close()


def mappings(ports) -> list[tuple[int, str, int]]:
    return sorted((p.guest_port, p.host_address, p.host_port) for p in ports)


def observe() -> dict:
    return asyncio.run(_observe())


async def _observe() -> dict:
    state_dir = Path(tempfile.mkdtemp(prefix="mvm-exposure-"))
    etcd = LocalEtcd(state_dir)
    node = NetworkedNode(etcd.endpoint, state_dir / "node")
    node.settings["network"] = {"reconcile_interval_seconds": RECONCILE_SECONDS}
    node.settings["compute"] = {
        "vmm": "fake",
        "image_cache_dir": str(fake_image_root(state_dir / "images")),
        "warm_pool_size": 0,
    }
    try:
        await start_installation(node)
        return await _scenario(node, int(node.http.rpartition(":")[2]))
    finally:
        await node.stop_all()
        etcd.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


async def _scenario(node: InProcessNode, http_port: int) -> dict:
    seen: dict = {}
    caller = await tenant_caller(node, "ports")
    network = network_pb2_grpc.NetworkServiceStub(node.channel(await node.address("network")))

    def call(method: str, request):
        return getattr(caller.stub, method)(request, metadata=caller.metadata, timeout=30)

    sandbox = (await call("CreateSandbox", api.CreateSandboxRequest())).sandbox
    sandbox_id = sandbox.name.split("/")[1]
    cluster_id = sandbox_key("ports", sandbox_id)  # the id the node's records use

    async def listed() -> list[tuple[int, str, int]]:
        return mappings((await call("GetSandbox", api.GetSandboxRequest(name=sandbox.name))).sandbox.exposed_ports)

    def expose(host_address: str = "", host_port: int = 0, guest_port: int = GUEST_PORT):
        request = api.ExposePortRequest(
            sandbox=sandbox.name, guest_port=guest_port, host_address=host_address, host_port=host_port
        )
        return call("ExposePort", request)

    def unexpose(**fields):
        try:
            return call("UnexposePort", api.UnexposePortRequest(sandbox=sandbox.name, **fields))
        except AttributeError as exc:  # before UnexposePort existed
            raise RuntimeError(exc) from None

    subprocess.run(["ip", "addr", "add", f"{sandbox.ip_address}/32", "dev", "lo"], check=True)

    async def answer(reader, writer):
        writer.write(f"guest {sandbox_id}:{writer.get_extra_info('sockname')[1]}".encode())
        await writer.drain()
        writer.close()

    guests = [await asyncio.start_server(answer, sandbox.ip_address, p) for p in (GUEST_PORT, OTHER_GUEST_PORT)]

    seen["refused"] = {
        "0.0.0.0": await outcome(expose("0.0.0.0")),
        "::": await outcome(expose("::")),
        "::1": await outcome(expose("::1")),
        HOST_ADDRESS: await outcome(expose(HOST_ADDRESS)),
        "port 80": await outcome(expose("127.0.0.1", 80)),
        f"port {LOW - 1}": await outcome(expose("", LOW - 1)),
        f"port {HIGH + 1}": await outcome(expose("", HIGH + 1)),
    }
    internal = {
        "0.0.0.0": network_pb2.ExposePortRequest(sandbox_id=sandbox_id, guest_port=GUEST_PORT, host_address="0.0.0.0"),
        "port 80": network_pb2.ExposePortRequest(sandbox_id=sandbox_id, guest_port=GUEST_PORT, host_port=80),
    }
    seen["refused_by_network"] = {k: await outcome(network.ExposePort(r, timeout=30)) for k, r in internal.items()}
    seen["after_refusals"] = {"listed": await listed(), "port 80": await through(80)}

    seen["chosen"] = await outcome(expose())
    chosen = int(seen["chosen"].rpartition(":")[2]) if seen["chosen"].startswith("OK") else 0
    seen["through_chosen"] = await through(chosen) if chosen else ""
    seen["asked"] = await outcome(expose("127.0.0.1", ASKED, OTHER_GUEST_PORT))
    seen["through_asked"] = await through(ASKED)
    seen["listed"] = await listed()

    intruder = await tenant_caller(node, "intruder")
    seen["unexposed_by_another_tenant"] = await outcome(
        intruder.stub.UnexposePort(
            api.UnexposePortRequest(sandbox=sandbox.name, guest_port=GUEST_PORT), metadata=intruder.metadata, timeout=30
        )
    )
    seen["through_chosen_after_intruder"] = await through(chosen) if chosen else ""
    try:
        seen["unexposed"] = mappings((await unexpose(guest_port=GUEST_PORT, host_port=chosen)).ports)
    except Exception as exc:  # noqa: BLE001
        seen["unexposed"] = f"ERROR {exc!r}"
    seen["through_chosen_after"] = await through(chosen) if chosen else ""
    seen["through_asked_after"] = await through(ASKED)
    seen["listed_after"] = await listed()
    attachments = (await network.ListAttachments(network_pb2.ListAttachmentsRequest(), timeout=30)).attachments
    seen["attached_after"] = [mappings(a.exposed_ports) for a in attachments if a.sandbox_id == cluster_id]
    try:
        seen["unexposed_again"] = await outcome(unexpose(guest_port=GUEST_PORT))
    except Exception as exc:  # noqa: BLE001
        seen["unexposed_again"] = f"ERROR {exc!r}"

    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{http_port}/v1/{sandbox.name}:unexposePort",
            json={"guestPort": OTHER_GUEST_PORT},
            headers={"Authorization": f"Bearer {caller.key}"},
        ) as response:
            seen["http_unexpose"] = (response.status, json.loads(await response.text()))
    seen["through_asked_after_http"] = await through(ASKED)
    seen["listed_after_http"] = await listed()

    async def mvm(*argv: str) -> tuple[int, str]:
        """The CLI (on the sync SDK) as a user runs it."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mvm_cli.main",
            "--gateway",
            await node.address("gateway"),
            *argv,
            env={**os.environ, "MVM_API_KEY": caller.key},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode().strip()

    seen["cli_expose"] = await mvm("expose", sandbox_id, str(GUEST_PORT))
    seen["cli_unexpose"] = await mvm("unexpose", sandbox_id, str(GUEST_PORT))
    seen["cli_unexpose_again"] = await mvm("unexpose", sandbox_id, str(GUEST_PORT))

    # A mapping recorded before the settings were narrowed (written here straight into the attachment record):
    # the network service's reconcile does not listen on it, and UnexposePort still removes it.
    records = Records(etcd_client_for(node.etcd_endpoint))
    attachment = (await records.get(ATTACHMENTS, node.node, cluster_id)).message
    attachment.exposed_ports.add(guest_port=GUEST_PORT, host_address="0.0.0.0", host_port=80)
    await records.put(ATTACHMENTS, attachment, node.node, cluster_id)
    await asyncio.sleep(3 * RECONCILE_SECONDS)
    seen["legacy_wildcard_80"] = await through(80)
    seen["legacy_unexposed"] = mappings((await unexpose(guest_port=GUEST_PORT, host_address="0.0.0.0")).ports)

    for guest in guests:
        guest.close()
    await call("DeleteSandbox", api.DeleteSandboxRequest(name=sandbox.name))
    return seen
