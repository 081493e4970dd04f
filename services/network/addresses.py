"""AddressPool: guest IP addresses allocated in etcd, never twice, reused after release.

`/microvm/network/<node>/addresses/<ip>` -> AddressLease (the owning sandbox), created with a transaction
that requires the key to be absent, so concurrent allocations never collide. The lowest free address is tried
first; a release deletes the key and the address becomes free at once.
"""

from __future__ import annotations

import ipaddress
import random

from microvm.types.v1 import network_pb2
from services.common.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from services.common.records import ADDRESSES, Records

ATTEMPTS = 1000


class AddressPool:
    def __init__(self, etcd, node: str, subnet: str) -> None:
        try:
            self.network = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise InvalidArgument(f"network.subnet {subnet!r} is not a network: {exc}") from None
        if self.network.num_addresses < 4:
            raise InvalidArgument(f"network.subnet {subnet} is too small")
        self.records = Records(etcd)
        self.node = node
        # The first host address is the bridge's (the guests' gateway).
        self.gateway = next(self.network.hosts())

    async def allocations(self) -> dict[str, str]:
        """Address -> owning sandbox id."""
        return {s.parts[1]: s.message.sandbox_id for s in await self.records.list(ADDRESSES, self.node)}

    async def _take(self, sandbox_id: str, address) -> bool:
        return await self.records.transaction(
            compare=[self.records.unchanged(ADDRESSES, 0, self.node, str(address))],
            success=[
                self.records.put_op(ADDRESSES, network_pb2.AddressLease(sandbox_id=sandbox_id), self.node, str(address))
            ],
        )

    async def allocate(self, sandbox_id: str) -> str:
        """The sandbox's address (the same one again if it already has one)."""
        taken = await self.allocations()
        for address, owner in taken.items():
            if owner == sandbox_id:
                return address
        candidates = [a for a in self.network.hosts() if a != self.gateway and str(a) not in taken]
        for attempt in range(ATTEMPTS):
            if not candidates:
                break
            # Lowest first; under contention spread out so racing allocators stop colliding.
            address = candidates.pop(0 if attempt < 3 else random.randrange(len(candidates)))
            if await self._take(sandbox_id, address):
                return str(address)
        raise ResourceExhausted(f"no free address left in {self.network}", reason="ADDRESSES_EXHAUSTED")

    async def release(self, sandbox_id: str) -> None:
        for address, owner in (await self.allocations()).items():
            if owner == sandbox_id:
                await self.forget(address)

    async def forget(self, address: str) -> None:
        await self.records.delete(ADDRESSES, self.node, address)

    async def claim(self, sandbox_id: str, address: str) -> None:
        """Records an address found in use (re-adoption after a restart)."""
        if not await self._take(sandbox_id, address) and (await self.allocations()).get(address) != sandbox_id:
            raise AlreadyExists(f"address {address} belongs to another sandbox", reason="ADDRESS_TAKEN")
