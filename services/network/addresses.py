"""AddressPool: guest IP addresses allocated in etcd, never twice, reused after release.

`/microvm/network/<node>/addresses/<ip>` -> sandbox id, created with a transaction that requires the key to
be absent, so concurrent allocations (from any number of network service instances) never collide. The
lowest free address is tried first; a release deletes the key and the address becomes free at once.
"""

from __future__ import annotations

import ipaddress
import random

from services.common.errors import AlreadyExists, InvalidArgument, ResourceExhausted

PREFIX = "/microvm/network/"
ATTEMPTS = 1000


class AddressPool:
    def __init__(self, etcd, node: str, subnet: str) -> None:
        try:
            self.network = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise InvalidArgument(f"network.subnet {subnet!r} is not a network: {exc}") from None
        if self.network.num_addresses < 4:
            raise InvalidArgument(f"network.subnet {subnet} is too small")
        self.etcd = etcd
        self.prefix = f"{PREFIX}{node}/addresses/"
        # The first host address is the bridge's (the guests' gateway).
        self.gateway = next(self.network.hosts())

    def key(self, address) -> bytes:
        return f"{self.prefix}{address}".encode()

    async def allocations(self) -> dict[str, str]:
        result = await self.etcd.get_prefix(self.prefix.encode())
        return {kv.key.decode()[len(self.prefix) :]: kv.value.decode() for kv in result}

    async def allocate(self, sandbox_id: str) -> str:
        """The sandbox's address (the same one again if it already has one)."""
        taken = await self.allocations()
        for address, owner in taken.items():
            if owner == sandbox_id:
                return address
        tx = self.etcd.transactions
        candidates = [a for a in self.network.hosts() if a != self.gateway and str(a) not in taken]
        for attempt in range(ATTEMPTS):
            if not candidates:
                break
            # Lowest first; under contention spread out so racing allocators stop colliding.
            address = candidates.pop(0 if attempt < 3 else random.randrange(len(candidates)))
            ok, _ = await self.etcd.transaction(
                compare=[tx.version(self.key(address)) == 0],
                success=[tx.put(self.key(address), sandbox_id.encode())],
                failure=[],
            )
            if ok:
                return str(address)
        raise ResourceExhausted(f"no free address left in {self.network}", reason="ADDRESSES_EXHAUSTED")

    async def release(self, sandbox_id: str) -> None:
        for address, owner in (await self.allocations()).items():
            if owner == sandbox_id:
                await self.etcd.delete(f"{self.prefix}{address}".encode())

    async def claim(self, sandbox_id: str, address: str) -> None:
        """Records an address found in use (re-adoption after a restart)."""
        tx = self.etcd.transactions
        key = f"{self.prefix}{address}".encode()
        ok, _ = await self.etcd.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, sandbox_id.encode())], failure=[]
        )
        if not ok and (await self.allocations()).get(address) != sandbox_id:
            raise AlreadyExists(f"address {address} belongs to another sandbox", reason="ADDRESS_TAKEN")
