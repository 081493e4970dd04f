"""The bootstrap every service runs: a start that fails after it took its node lock still ends at once, releases
the lock and leaves no task behind (CI saw a compute with a missing VMM binary hang instead of exiting 2)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.config import ConfigError
from services.common.records import NODE_LOCKS, Records
from services.common.server import serve
from services.common.settings import ComputeSettings
from tests.inprocess import InProcessNode


async def test_a_failed_wiring_releases_the_node_lock_and_every_task(etcd_server, etcd, tmp_path):
    node = InProcessNode(etcd_server.endpoint, tmp_path)
    took_the_lock = asyncio.Event()

    async def failing_wiring(server, context):
        assert (await Records(context.etcd).get(NODE_LOCKS, node.node, "compute")) is not None
        took_the_lock.set()
        raise ConfigError("compute.qemu_binary: /nonexistent/vmm is not an executable")

    before = set(asyncio.all_tasks())
    with pytest.raises(ConfigError, match="/nonexistent/vmm"):
        await asyncio.wait_for(serve("compute", node.common(), ComputeSettings(), failing_wiring), 20)
    assert took_the_lock.is_set()
    assert (await Records(etcd).get(NODE_LOCKS, node.node, "compute")) is None
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not left, [t.get_name() for t in left]
