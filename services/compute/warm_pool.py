"""WarmStart: turns a create into a resume (the pool) or a restore (template snapshots) instead of a boot.

The pool keeps `warm_pool_size` restored, paused VMs per template, of the default size; a create of that size
takes one (resumed and renamed: milliseconds), and the pool is refilled in the background. Other sizes restore
from their template snapshot when there is one. `maintain` keeps both filled and current.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import structlog

from microvm.types.v1 import network_pb2 as network_types
from microvm.types.v1 import vm_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import AlreadyExists, ResourceExhausted, ServiceError
from services.common.tasks import cancel_and_wait
from services.compute.images import is_user_image
from services.compute.lifecycle import VmLifecycle
from services.compute.snapshots import VmSnapshots
from services.compute.template_exchange import TemplateExchange
from services.compute.templates import TemplateSnapshots

log = structlog.get_logger()


class WarmStart:
    def __init__(
        self,
        lifecycle: VmLifecycle,
        snapshots: VmSnapshots,
        templates: TemplateSnapshots,
        exchange: TemplateExchange | None = None,
    ) -> None:
        self.lifecycle, self.snapshots, self.templates, self.exchange = lifecycle, snapshots, templates, exchange
        self.settings = lifecycle.settings
        self.pool: dict[str, list[str]] = {}
        self._task: asyncio.Task | None = None
        self._claim_lock = asyncio.Lock()
        self._obtaining: dict[tuple[str, int, int], asyncio.Lock] = {}
        self._claimed_at: dict[str, float] = {}  # template -> when a VM of its pool was last handed out
        self._claimed = asyncio.Event()  # set on every claim: a held refill looks again
        # Told of each VM added to a pool and how long its restore and warm-up took (the node's metrics).
        self.on_refilled = lambda template, seconds: None

    @property
    def enabled(self) -> bool:
        return self.settings.template_snapshots and self.lifecycle.driver.supports_template_snapshots

    async def start(
        self,
        vm_id: str,
        template: str,
        vcpus: int,
        memory_mib: int,
        hostname: str,
        policy: network_types.NetworkPolicy | None,
    ) -> VmRecord | None:
        """The VM started warm, or None: the caller boots it cold."""
        if not self.enabled:
            return None
        if (vcpus, memory_mib) == self.templates.size_of(template):
            vm = await self.claim(template, vm_id, hostname, policy)
            if vm is not None:
                return vm
        frozen = self.templates.frozen(template, vcpus, memory_mib)
        if frozen is not None:
            try:
                return await self.snapshots.restore_from(
                    frozen, vm_id, hostname, start_method="template-snapshot", policy=policy
                )
            except ServiceError as exc:
                # A template snapshot that does not restore is not trusted again: boot cold, rebuild it.
                log.warning("template_snapshot_restore_failed", template=template, error=exc.message)
                self.templates.invalidate(template, vcpus, memory_mib)
        self.templates.cold_booted(template, vcpus, memory_mib)
        return None

    def adopt(self, vm: VmRecord) -> None:
        """A paused pool VM that survived a compute restart."""
        self.pool.setdefault(vm.template, []).append(vm.id)

    async def claim(
        self, template: str, vm_id: str, hostname: str, policy: network_types.NetworkPolicy | None
    ) -> VmRecord | None:
        """Hands out a pooled VM as `vm_id`; None if none is ready. Only taking one from the pool is under the lock:
        a burst of creates resumes and identifies its VMs side by side."""
        try:
            while (pooled := await self._take(template)) is not None:
                try:
                    claimed = await self.lifecycle.claim(pooled, vm_id, hostname, policy)
                    self._claimed_at[template] = time.monotonic()
                    self._claimed.set()
                    return claimed
                except (ResourceExhausted, AlreadyExists):
                    # Refused before it was resumed (the node is full, the id taken): it stays in the pool.
                    self.pool.setdefault(template, []).insert(0, pooled.id)
                    raise
                except ServiceError as exc:
                    log.warning("warm_pool_claim_failed", vm=pooled.id, error=exc.message)
            return None
        finally:
            self.templates.changed.set()

    async def _take(self, template: str) -> VmRecord | None:
        async with self._claim_lock:
            candidates = self.pool.get(template, [])
            while candidates:
                pooled = self.lifecycle.ledger.vms.get(candidates.pop(0))
                if pooled is not None and pooled.state == vm_pb2.VM_STATE_PAUSED:
                    return pooled
        return None

    def pool_size(self, template: str) -> int:
        """A built-in template's pool is the node's setting; a user template's is its own (none by default)."""
        if not is_user_image(template):
            return self.settings.warm_pool_size
        return max(0, min(self.lifecycle.images.config(template).pool_size, self.settings.warm_pool_size))

    async def forget_image(self, template: str) -> None:
        """Drops the pool and template snapshots of an image being deleted."""
        async with self._claim_lock:
            for vm_id in self.pool.pop(template, []):
                if vm_id in self.lifecycle.ledger.vms:
                    await self.lifecycle.delete(vm_id)
        self.templates.forget(template)

    async def _shrink(self, template: str) -> None:
        """Deletes pooled VMs beyond the template's pool size (it was lowered)."""
        async with self._claim_lock:
            pool = self.pool.get(template, [])
            while len(pool) > self.pool_size(template):
                vm_id = pool.pop()
                if vm_id in self.lifecycle.ledger.vms:
                    await self.lifecycle.delete(vm_id)

    async def _fill(self, template: str, frozen: Path) -> None:
        while len(self.pool.setdefault(template, [])) < self.pool_size(template):
            await self._after_claim(template)
            began = time.monotonic()
            vm_id = f"pool-{uuid.uuid4().hex[:10]}"
            await self.snapshots.restore_from(frozen, vm_id, vm_id, start_method="warm-pool", pooled=True)
            # Under TCG each new VMM process translates guest code afresh: exercise the exec path now, not on the
            # user's first command.
            await self.templates.warm_up(vm_id, template)
            await self.lifecycle.set_paused(vm_id, True)
            self.pool[template].append(vm_id)
            self.on_refilled(template, time.monotonic() - began)

    async def _after_claim(self, template: str) -> None:
        """Holds a refill back for `pool_refill_delay_ms` after the template's last claim while its pool still has a
        VM ready: under TCG a restore and its warm-up take a core for about a second, and the sandbox just handed
        out runs its first commands now (they took 30-40 ms instead of 15-20 beside a refill). A burst that empties
        the pool is not held back."""
        while self.pool.get(template):
            hold = self._claimed_at.get(template, 0.0) + self.settings.pool_refill_delay_ms / 1000 - time.monotonic()
            if hold <= 0:
                return
            self._claimed.clear()
            try:
                async with asyncio.timeout(hold):
                    await self._claimed.wait()
            except TimeoutError:
                pass

    async def ensure_snapshot(self, template: str, vcpus: int, memory_mib: int) -> None:
        """`_obtain` unless the snapshot is there; one at a time per template and size (the upkeep loop and a
        template build's publish may both want it)."""
        lock = self._obtaining.setdefault((template, vcpus, memory_mib), asyncio.Lock())
        async with lock:
            if self.templates.frozen(template, vcpus, memory_mib) is None:
                await self._obtain(template, vcpus, memory_mib)

    async def _obtain(self, template: str, vcpus: int, memory_mib: int) -> None:
        """A template snapshot of that size: fetched from a node that published one, else built here and
        published for the others."""
        if self.exchange is not None:
            try:
                if await self.exchange.fetch(template, vcpus, memory_mib):
                    return
            except (ServiceError, grpc.aio.AioRpcError) as exc:
                log.warning("template_snapshot_fetch_failed", template=template, error=str(exc))
        await self.templates.build(template, vcpus, memory_mib)
        if self.exchange is not None:
            await self.exchange.publish(template, vcpus, memory_mib)

    def start_upkeep(self, network_ready) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._maintain(network_ready), name="warm-start")

    async def _maintain(self, network_ready) -> None:
        # Every VM needs its TAP: building a template before the node's network service is up only fails.
        await network_ready()
        while True:
            self.templates.changed.clear()
            for template in self.lifecycle.templates():
                try:
                    frozen = self.templates.frozen(template)
                    if frozen is None:
                        await self.ensure_snapshot(template, *self.templates.size_of(template))
                        frozen = self.templates.frozen(template)
                    if frozen is not None and self.pool_size(template):
                        await self._fill(template, frozen)
                    await self._shrink(template)
                    for vcpus, memory_mib in self.templates.wanted(template)[1:]:
                        if self.templates.frozen(template, vcpus, memory_mib) is None:
                            await self.ensure_snapshot(template, vcpus, memory_mib)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("warm_start_upkeep_failed", template=template, error=str(exc))
                    await asyncio.sleep(5)
            try:
                async with asyncio.timeout(30):
                    await self.templates.changed.wait()
            except TimeoutError:
                pass

    async def close(self) -> None:
        await cancel_and_wait(self._task)
