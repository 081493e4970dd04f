"""Service registration and discovery in etcd.

Key layout (see docs/etcd-keys.md): `/microvm/services/<kind>/<instance-id>` -> JSON
{"address", "pid", "started", "metadata"}, attached to a lease that a background task keeps alive.
A crashed instance stops refreshing and its key disappears within the lease TTL; a clean shutdown
revokes the lease so the key goes at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aetcd
import structlog

from services.common.config import parse_address

SERVICES_PREFIX = "/microvm/services/"
log = structlog.get_logger()


def etcd_client(endpoints: list[str], timeout: float = 5.0) -> aetcd.Client:
    # aetcd speaks to one endpoint; a single-member loopback etcd is the supported local layout.
    host, port = parse_address(endpoints[0], key="etcd_endpoints", allow_zero=False)
    return aetcd.Client(host=host, port=port, timeout=timeout)


@dataclass
class ServiceInstance:
    kind: str
    instance_id: str
    address: str
    pid: int = 0
    started: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{SERVICES_PREFIX}{self.kind}/{self.instance_id}"

    def encode(self) -> bytes:
        return json.dumps(
            {"address": self.address, "pid": self.pid, "started": self.started, "metadata": self.metadata}
        ).encode()

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> ServiceInstance:
        kind, instance_id = key.decode()[len(SERVICES_PREFIX) :].split("/", 1)
        data = json.loads(value)
        return cls(
            kind=kind,
            instance_id=instance_id,
            address=data["address"],
            pid=data.get("pid", 0),
            started=data.get("started", 0.0),
            metadata=data.get("metadata", {}),
        )


class ServiceRegistration:
    """Keeps one instance registered under a lease until `close()`."""

    def __init__(self, client: aetcd.Client, instance: ServiceInstance, ttl: int) -> None:
        self._client = client
        self.instance = instance
        self._ttl = ttl
        self._lease: aetcd.leases.Lease | None = None
        self._task: asyncio.Task | None = None

    async def open(self) -> None:
        self.instance.pid = self.instance.pid or os.getpid()
        self.instance.started = self.instance.started or time.time()
        await self._grant_and_put()
        self._task = asyncio.create_task(self._keep_alive(), name=f"lease-keepalive-{self.instance.key}")

    async def update_metadata(self, **metadata: Any) -> None:
        self.instance.metadata.update(metadata)
        await self._client.put(self.instance.key.encode(), self.instance.encode(), lease=self._lease)

    async def _grant_and_put(self) -> None:
        self._lease = await self._client.lease(self._ttl)
        await self._client.put(self.instance.key.encode(), self.instance.encode(), lease=self._lease)

    async def _keep_alive(self) -> None:
        interval = max(self._ttl / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await asyncio.wait_for(self._lease.refresh(), timeout=interval * 2)
                expired = reply is None or reply.TTL <= 0
                if expired:
                    # The lease ran out (etcd restarted or we stalled): register again.
                    log.warning("registration_lease_lost", key=self.instance.key)
                    await self._grant_and_put()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd briefly unreachable: keep trying, the TTL bounds staleness
                log.warning("registration_refresh_failed", key=self.instance.key, error=str(exc))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), timeout=2)
            except Exception as exc:
                log.warning("registration_revoke_failed", key=self.instance.key, error=str(exc))


class ServiceDirectory:
    """A live view of registered instances, kept current by an etcd watch on the prefix."""

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._instances: dict[str, ServiceInstance] = {}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Condition()

    async def open(self) -> None:
        await self._reload()
        self._task = asyncio.create_task(self._watch_forever(), name="service-directory-watch")

    async def _reload(self) -> int:
        result = await self._client.get_prefix(SERVICES_PREFIX.encode())
        self._instances = {kv.key.decode(): ServiceInstance.decode(kv.key, kv.value) for kv in result}
        return result.header.revision if result.header else 0

    async def _watch_forever(self) -> None:
        revision = None
        while True:
            try:
                revision = await self._reload()
                async with self._changed:
                    self._changed.notify_all()
                watch = await self._client.watch_prefix(SERVICES_PREFIX.encode(), start_revision=revision + 1)
                async for event in watch:
                    key = event.kv.key.decode()
                    if event.kind == aetcd.rtypes.EventKind.PUT:
                        self._instances[key] = ServiceInstance.decode(event.kv.key, event.kv.value)
                    else:
                        self._instances.pop(key, None)
                    async with self._changed:
                        self._changed.notify_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("service_directory_watch_failed", error=str(exc))
                await asyncio.sleep(0.5)

    def instances(self, kind: str) -> list[ServiceInstance]:
        return sorted((i for i in self._instances.values() if i.kind == kind), key=lambda i: i.instance_id)

    def newest(self, kind: str, node: str | None = None) -> ServiceInstance:
        """The most recently started instance of `kind` (on `node`, for per-node services); a restarted
        one may overlap its predecessor's registration until that lease expires."""
        from services.common.errors import Unavailable

        instances = [i for i in self.instances(kind) if node is None or i.metadata.get("node") == node]
        if not instances:
            where = "" if node is None else f" on node {node}"
            raise Unavailable(
                f"the {kind} service{where} is not available",
                reason=f"{kind.upper()}_UNAVAILABLE",
                metadata={"node": node} if node else None,
            )
        return max(instances, key=lambda i: i.started)

    async def wait_for(self, kind: str, timeout: float) -> list[ServiceInstance]:
        """Instances of `kind`, waiting up to `timeout` seconds for at least one to appear."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.instances(kind)), timeout)
        return self.instances(kind)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
