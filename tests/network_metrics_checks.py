"""What tests/unit/test_network_metrics.py does inside its network namespace (see tests/netns.py `run_in`): a one-node
installation with networking on (fake VMM, bridge, TAPs, nftables), two sandboxes made and one deleted, the network
service's /metrics read after each step; returned as plain values."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.etcd import LocalEtcd
from tests.exposure_checks import NetworkedNode
from tests.inprocess import fake_image_root, start_installation, tenant_caller
from tests.prometheus_text import scrape

SUBNET = "10.213.0.0/28"  # 14 hosts, one of them the bridge's


def observe() -> dict:
    return asyncio.run(_observe())


async def _observe() -> dict:
    state_dir = Path(tempfile.mkdtemp(prefix="mvm-netmetrics-"))
    etcd = LocalEtcd(state_dir)
    node = NetworkedNode(etcd.endpoint, state_dir / "node")
    node.settings["network"] = {"subnet": SUBNET}
    images = str(fake_image_root(state_dir / "images"))
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": images, "warm_pool_size": 0}
    try:
        await start_installation(node)
        return await _scenario(node)
    finally:
        await node.stop_all()
        etcd.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


async def _scenario(node: NetworkedNode) -> dict:
    caller = await tenant_caller(node, "netmetrics")
    address = await node.metrics_address("network")

    async def read() -> dict:
        samples = await asyncio.to_thread(scrape, address)
        return {
            "addresses": {
                dict(pairs)["state"]: (dict(pairs)["subnet"], value)
                for (name, pairs), value in samples.items()
                if name == "microvm_ip_addresses"
            },
            "taps": samples.get(("microvm_tap_devices", ())),
        }

    for _ in range(300):  # the template's snapshot is built first, by a VM of its own that holds an address
        before = await read()
        if before["addresses"].get("used", ("", -1))[1] == 0 and before["taps"] == 0:
            break
        await asyncio.sleep(0.1)
    seen = {"before": before}
    names = []
    for _ in range(2):
        created = await caller.stub.CreateSandbox(api.CreateSandboxRequest(), metadata=caller.metadata, timeout=60)
        names.append(created.sandbox.name)
    seen["two_sandboxes"] = await read()
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=names[0]), metadata=caller.metadata, timeout=60)
    seen["one_deleted"] = await read()
    await caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=names[1]), metadata=caller.metadata, timeout=60)
    return seen
