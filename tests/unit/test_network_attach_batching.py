"""Attachments made together (a fork's clones) share their firewall convergence: fewer nft runs than attachments,
and still none returns before rules that include it are applied. NodeNetwork with real etcd; the host's links and
nft stand in (recorded)."""

from __future__ import annotations

import asyncio
import uuid

from microvm.sandbox.v1 import sandbox_pb2
from services.common.settings import NetworkSettings
from services.network.node import NodeNetwork


class RecordingLinks:
    async def create_tap(self, name: str) -> None:
        await asyncio.sleep(0)

    async def delete_tap(self, name: str) -> None:
        pass


class RecordingFirewall:
    def __init__(self, fail_first: bool = False) -> None:
        self.applied: list[set[str]] = []
        self.fail_first = fail_first

    async def apply(self, attachments) -> None:
        await asyncio.sleep(0.05)  # an nft run: the other attaches arrive meanwhile
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("nft: Could not process rule")
        self.applied.append({a.sandbox_id for a in attachments})


def network(etcd, firewall: RecordingFirewall) -> NodeNetwork:
    node = NodeNetwork(NetworkSettings(dns_servers=["10.0.0.53"]), etcd, f"node-{uuid.uuid4().hex[:8]}")
    node.links, node.firewall = RecordingLinks(), firewall
    return node


async def test_attaches_made_together_share_one_convergence_and_each_waits_for_its_own_rules(etcd):
    firewall = RecordingFirewall()
    node = network(etcd, firewall)

    async def attach(sandbox_id: str) -> None:
        await node.attach(sandbox_id, sandbox_pb2.NetworkPolicy())
        # Returned: the rules applied last already hold this attachment.
        assert sandbox_id in firewall.applied[-1]

    sandboxes = [f"sbx-batch-{i}" for i in range(10)]
    await asyncio.gather(*(attach(s) for s in sandboxes))
    assert len(firewall.applied) < len(sandboxes)
    assert firewall.applied[-1] == set(sandboxes)
    for sandbox_id in sandboxes:
        await node.detach(sandbox_id)


async def test_an_attach_whose_convergence_fails_is_undone_and_the_others_converge_again(etcd):
    firewall = RecordingFirewall(fail_first=True)
    node = network(etcd, firewall)
    results = await asyncio.gather(
        *(node.attach(f"sbx-fail-{i}", sandbox_pb2.NetworkPolicy()) for i in range(4)), return_exceptions=True
    )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert len(failed) == 1
    kept = {a.sandbox_id for a in await node.attachments()}
    assert kept == {f"sbx-fail-{i}" for i in range(4) if i not in failed}
    assert kept <= firewall.applied[-1]
    for sandbox_id in kept:
        await node.detach(sandbox_id)
