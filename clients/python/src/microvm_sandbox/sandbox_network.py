"""A sandbox's network methods, mixed into the sandbox classes: the outbound policy (`set_egress`) and guest ports
made reachable on its node (`expose_port`, `unexpose_port`); async (`AsyncNetworkMethods`) and sync
(`NetworkMethods`)."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox.models import egress_policy

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.client import AsyncClient
    from microvm_sandbox.sync_loop import Loop


class AsyncNetworkMethods:
    """`AsyncSandbox`'s network methods (the sandbox provides `name`, `client` and `_update`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient
    _update: Callable[..., Awaitable[None]]

    async def set_egress(self, egress: str | None = None, allow: Sequence[str] = ()) -> None:
        """Replaces the outbound policy at once (connections it no longer allows stop)."""
        await self._update(sandbox_pb2.Sandbox(network_policy=egress_policy(egress, allow)), "network_policy")

    async def expose_port(self, guest_port: int, host_port: int = 0, host_address: str = "") -> sandbox_pb2.ExposedPort:
        """Makes `guest_port` reachable at host_address:host_port on the sandbox's node (loopback and a free
        port of the node's range, 30000-32767 by default); returns the mapping. Addresses and ports the node does
        not allow raise InvalidArgumentError. It lasts until `unexpose_port` or the sandbox's end."""
        reply = await self.client.call(
            "ExposePort",
            api.ExposePortRequest(
                sandbox=self.name, guest_port=guest_port, host_port=host_port, host_address=host_address
            ),
        )
        port: sandbox_pb2.ExposedPort = reply.port
        return port

    async def unexpose_port(
        self, guest_port: int, host_port: int = 0, host_address: str = ""
    ) -> builtins.list[sandbox_pb2.ExposedPort]:
        """Stops exposing `guest_port` (only the mapping on host_address:host_port when given); returns the
        mappings removed. NotFoundError when nothing matches."""
        reply = await self.client.call(
            "UnexposePort",
            api.UnexposePortRequest(
                sandbox=self.name, guest_port=guest_port, host_port=host_port, host_address=host_address
            ),
        )
        return list(reply.ports)


class NetworkMethods:
    """`Sandbox`'s network methods (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    def set_egress(self, egress: str | None = None, allow: Sequence[str] = ()) -> None:
        """Replaces the outbound policy at once."""
        self._loop.run(self.aio.set_egress(egress, allow))

    def expose_port(self, guest_port: int, host_port: int = 0, host_address: str = "") -> sandbox_pb2.ExposedPort:
        """Makes `guest_port` reachable on the sandbox's node; returns the mapping."""
        return self._loop.run(self.aio.expose_port(guest_port, host_port, host_address))

    def unexpose_port(
        self, guest_port: int, host_port: int = 0, host_address: str = ""
    ) -> builtins.list[sandbox_pb2.ExposedPort]:
        """Stops exposing `guest_port`; returns the mappings removed. NotFoundError when nothing matches."""
        return self._loop.run(self.aio.unexpose_port(guest_port, host_port, host_address))
