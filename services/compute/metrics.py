"""Compute's Prometheus metrics: its VMs by state and template, the warm pool's depth, the node's capacity and what
is allocated of it, disk, and how long VMs take to start by the path they took (warm pool, template snapshot,
snapshot restore, cold boot). Read from what compute already keeps (the ledger, the pool) when Prometheus scrapes.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

from prometheus_client import Histogram

from microvm.types.v1.vm_pb2 import VmRecord
from services.common.metrics import ServiceMetrics
from services.compute.ledger import state_name

# Seconds: a pool claim takes milliseconds, a cold boot under TCG tens of seconds.
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)


class ComputeMetrics:
    def __init__(self, metrics: ServiceMetrics, node) -> None:
        self.node = node
        self.starts = Histogram(
            "microvm_vm_start_seconds",
            "Time from a VM's admission to its agent answering, by start method",
            ["method"],
            buckets=START_BUCKETS,
            registry=metrics.registry,
        )
        metrics.gauge_callback(
            "microvm_vms",
            "VMs on this node by state and template (pool VMs are state `pooled`)",
            ["state", "template"],
            self.vms,
        )
        self.refills = Histogram(
            "microvm_warm_pool_refill_seconds",
            "Time to add one VM to a warm pool: its restore and warm-up",
            ["template"],
            buckets=START_BUCKETS,
            registry=metrics.registry,
        )
        metrics.gauge_callback("microvm_warm_pool_vms", "Paused VMs waiting in the warm pool", ["template"], self.pool)
        metrics.gauge_callback("microvm_node_capacity", "What this node offers", ["resource"], self.capacity)
        metrics.gauge_callback("microvm_node_allocated", "What this node's VMs hold", ["resource"], self.allocated)
        metrics.gauge_callback("microvm_node_disk_bytes", "The state directory's file system", ["kind"], self.disk)

    def started(self, vm: VmRecord, method: str, since: float | None = None) -> None:
        """A VM answered: `since` is a time.time() of its start, else its record's creation time."""
        began = since if since is not None else vm.create_time.ToMilliseconds() / 1000
        self.starts.labels(method).observe(max(0.0, time.time() - began))

    def refilled(self, template: str, seconds: float) -> None:
        self.refills.labels(template).observe(seconds)

    def vms(self) -> dict:
        counts = Counter(
            ("pooled" if vm.pooled else state_name(vm).lower(), vm.template) for vm in self.node.ledger.vms.values()
        )
        return {key: count for key, count in counts.items()}

    def pool(self) -> dict:
        return {(template,): len(ids) for template, ids in self.node.warm.pool.items()}

    def capacity(self) -> dict:
        settings = self.node.lifecycle.settings
        return {("vcpus",): settings.vcpus_total, ("memory_bytes",): settings.memory_mib_total << 20}

    def allocated(self) -> dict:
        vcpus, memory_mib = self.node.ledger.used()
        return {("vcpus",): vcpus, ("memory_bytes",): memory_mib << 20}

    def disk(self) -> dict:
        usage = shutil.disk_usage(Path(self.node.context.common.state_dir))
        return {("total",): usage.total, ("free",): usage.free}
