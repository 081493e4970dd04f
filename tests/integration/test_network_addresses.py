"""Guest address allocation in etcd (the network service's ledger): unique under concurrency, reused."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.common.errors import ResourceExhausted
from services.network.addresses import AddressPool


def run(stack, scenario):
    async def wrapper():
        client = stack.etcd_client()
        await client.connect()
        try:
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(wrapper())


def test_fifty_concurrent_allocations_are_unique_and_released_addresses_are_reused(stack):
    node = f"test-{uuid.uuid4().hex[:6]}"

    async def scenario(client):
        pools = [AddressPool(client, node, "10.200.0.0/24") for _ in range(5)]  # five racing allocators
        addresses = await asyncio.gather(*(pools[i % 5].allocate(f"sbx-{i}") for i in range(50)))
        assert len(set(addresses)) == 50
        assert "10.200.0.1" not in addresses  # the gateway's
        assert await pools[0].allocate("sbx-7") == addresses[7]  # idempotent per sandbox
        await client.delete_prefix(f"/microvm/network/{node}/".encode())
        # Released addresses come back: the lowest free one is handed out first.
        first, second, third = [await pools[0].allocate(f"seq-{i}") for i in range(3)]
        assert (first, second, third) == ("10.200.0.2", "10.200.0.3", "10.200.0.4")
        await pools[0].release("seq-1")
        assert await pools[1].allocate("seq-new") == second
        await client.delete_prefix(f"/microvm/network/{node}/".encode())

    run(stack, scenario)


def test_a_full_subnet_is_resource_exhausted(stack):
    node = f"test-{uuid.uuid4().hex[:6]}"

    async def scenario(client):
        pool = AddressPool(client, node, "10.201.0.0/29")  # 6 hosts, one is the gateway
        for i in range(5):
            await pool.allocate(f"sbx-{i}")
        with pytest.raises(ResourceExhausted):
            await pool.allocate("sbx-one-too-many")
        await client.delete_prefix(f"/microvm/network/{node}/".encode())

    run(stack, scenario)
