"""NodeReporter: this node as the cluster sees it, in `/microvm/nodes/<node>` (written only here).

Capacity, accelerator, labels, built templates and the template snapshots held locally: what placement scores
nodes on. Written at start and again whenever it changes (checked every few seconds). Liveness is not in it:
a node is alive while its compute service is registered.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from microvm.types.v1 import node_pb2
from services.common.records import NODES, Records
from services.compute.lifecycle import VmLifecycle
from services.compute.templates import TemplateSnapshots


def parse_labels(labels: list[str]) -> dict[str, str]:
    return dict(label.split("=", 1) for label in labels)


class NodeReporter:
    def __init__(
        self,
        records: Records,
        lifecycle: VmLifecycle,
        templates: TemplateSnapshots,
        state_dir: Path,
        labels: dict[str, str],
        hypervisor_reason: str,
    ) -> None:
        self.records, self.lifecycle, self.templates = records, lifecycle, templates
        self.state_dir, self.labels, self.hypervisor_reason = state_dir, labels, hypervisor_reason
        self._last: bytes = b""

    def record(self) -> node_pb2.NodeRecord:
        settings, driver = self.lifecycle.settings, self.lifecycle.driver
        try:
            disk = shutil.disk_usage(self.state_dir)
            disk_free, disk_total = disk.free, disk.total
        except OSError:
            disk_free = disk_total = 0
        return node_pb2.NodeRecord(
            name=self.lifecycle.node,
            capacity=node_pb2.NodeCapacity(
                vcpus=settings.vcpus_total,
                memory_mib=settings.memory_mib_total,
                # Rounded to 64 MiB: the record is rewritten on change, not on every written byte.
                disk_free_bytes=disk_free >> 26 << 26,
                disk_total_bytes=disk_total,
                max_vcpus_per_vm=settings.max_vcpus_per_vm,
                max_memory_mib_per_vm=settings.max_memory_mib_per_vm,
            ),
            vmm=driver.name,
            accel=driver.accel,
            hypervisor_reason=self.hypervisor_reason,
            labels=self.labels,
            templates=self.lifecycle.templates(),
            template_disk_bytes=self.lifecycle.template_disk_bytes(),
            template_builds=self.lifecycle.template_builds(),
            template_snapshots=self.templates.held(),
            networking=self.lifecycle.network is not None,
        )

    async def publish(self) -> bool:
        """Writes the record if it changed; True when it did."""
        record = self.record()
        serialized = NODES.encode(record)
        if serialized == self._last:
            return False
        record.update_time.GetCurrentTime()
        await self.records.put(NODES, record, record.name)
        self._last = serialized
        return True
