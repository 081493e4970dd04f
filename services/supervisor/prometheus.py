"""Prometheus beside the stack (`make up`): its configuration, and the scrape targets it discovers from the service
registry in etcd.

Every service registers its /metrics address (metadata `metrics`, services/common/metrics.py). The supervisor keeps
a file_sd targets file in step with the registry (watched, rewritten atomically on change), and Prometheus re-reads
it by itself: a new instance is scraped within seconds, with no restart and no Prometheus configuration edited by
hand. Each target carries `job` (the service kind), `node` (node services) and `service_instance`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import structlog

from services.common.registry import ServiceDirectory, ServiceInstance, etcd_client

log = structlog.get_logger()

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
SCRAPE_INTERVAL = "5s"


def scrape_targets(instances: list[ServiceInstance]) -> list[dict]:
    """file_sd groups, one per instance that serves metrics, sorted so that an unchanged registry writes the same
    bytes."""
    groups = []
    for instance in sorted(instances, key=lambda i: (i.kind, i.instance_id)):
        address = instance.metadata.get("metrics")
        if not address:
            continue
        labels = {"job": instance.kind, "service_instance": instance.instance_id}
        if instance.node:
            labels["node"] = instance.node
        groups.append({"targets": [address], "labels": labels})
    return groups


def configuration(targets_file: Path, rules_dir: Path = RULES_DIR) -> str:
    """Prometheus's YAML (JSON is YAML): one scrape job fed by the targets file, whose `job` label each target sets."""
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "15s"},
        "rule_files": [str(rules_dir / "*.yml")],
        "scrape_configs": [
            {
                "job_name": "microvm",
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def write_atomically(path: Path, text: str) -> bool:
    """Writes `text` unless the file already holds it; True when it wrote. Prometheus never reads half a file."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return True


class TargetsFile:
    """Keeps `path` equal to the registry's scrape targets while `run` runs."""

    def __init__(self, directory: ServiceDirectory, path: Path) -> None:
        self.directory, self.path = directory, path

    def refresh(self) -> bool:
        targets = scrape_targets(self.directory.every_instance())
        return write_atomically(self.path, json.dumps(targets, indent=2) + "\n")

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        while not stop.is_set():
            try:
                if self.refresh():
                    log.info("prometheus_targets_written", path=str(self.path))
            except OSError as error:
                log.warning("prometheus_targets_unwritable", path=str(self.path), error=str(error))
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                pass


async def prepare(settings, state_dir: Path, etcd_endpoints: list[str], etcd_identity):
    """(Prometheus's command, a coroutine function keeping its targets until the given event is set), or None where
    the binary is missing. Writes the configuration and a first targets file."""
    binary = shutil.which(settings.prometheus_binary)
    if binary is None:
        return None
    home = state_dir / "prometheus"
    targets = home / "targets.json"
    write_atomically(home / "prometheus.yml", configuration(targets))
    client = etcd_client(etcd_endpoints, timeout=5, identity=etcd_identity)
    await client.connect()
    directory = ServiceDirectory(client)
    await directory.open()
    writer = TargetsFile(directory, targets)
    writer.refresh()
    command = [
        binary,
        f"--config.file={home / 'prometheus.yml'}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--storage.tsdb.retention.time={settings.prometheus_retention}",
        f"--web.listen-address={settings.prometheus_listen}",
    ]

    async def keep_targets(stop: asyncio.Event) -> None:
        try:
            await writer.run(stop)
        finally:
            await directory.close()
            await client.close()

    return command, keep_targets
