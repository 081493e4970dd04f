"""Prometheus finds every service from the registry (services/supervisor/prometheus.py): a real Debian Prometheus
scrapes a whole installation (fake VMM) through the targets file the supervisor keeps, and a service instance
started later is scraped without Prometheus being restarted or reconfigured."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from services.common.registry import ServiceDirectory
from services.supervisor.prometheus import RULES_DIR, TargetsFile, configuration
from tests.etcd import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed (make apt installs it)"
)
KINDS = {"gateway", "auth", "compute", "network", "relay", "snapshot"}


def query(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


async def until(port: int, expression: str, accept, what: str, bound: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + bound
    while True:
        try:
            result = await asyncio.to_thread(query, port, expression)
            if accept(result):
                return result
        except OSError:
            result = "prometheus not answering yet"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: last answer {result}")
        await asyncio.sleep(0.5)


@pytest.fixture
async def prometheus(tmp_path: Path):
    port = free_port()
    targets = tmp_path / "targets.json"
    targets.write_text("[]\n")
    (tmp_path / "prometheus.yml").write_text(configuration(targets))
    command = [
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port, targets
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_every_service_is_scraped_and_a_new_instance_appears_without_a_restart(installation, prometheus, etcd):
    port, targets_path = prometheus
    directory = ServiceDirectory(etcd)
    await directory.open()
    stop = asyncio.Event()
    writer = asyncio.create_task(TargetsFile(directory, targets_path).run(stop, period=0.2))
    try:
        mine = f'node="{installation.node}"'
        up = await until(
            port,
            f'up{{{mine}}} == 1 or up{{job=~"gateway|auth"}} == 1',
            lambda result: {sample["metric"]["job"] for sample in result} >= KINDS,
            "every kind scraped",
        )
        assert all(sample["metric"]["service_instance"] for sample in up)
        # Real samples of the services' own metrics arrive through the discovered targets.
        await until(port, "grpc_server_handled_total", bool, "gRPC metrics scraped")
        await until(port, f"microvm_node_capacity{{{mine}}}", bool, "compute's metrics scraped")

        auth_instances = len(directory.instances("auth"))
        await installation.start("auth", key="auth-second")
        try:
            await until(
                port,
                'count(up{job="auth"} == 1)',
                lambda result: result and int(float(result[0]["value"][1])) >= auth_instances + 1,
                "the second auth instance scraped",
            )
        finally:
            await installation.stop("auth-second")
        assert json.loads(targets_path.read_text()), "the targets file lists the registry's services"
    finally:
        stop.set()
        await writer
        await directory.close()


def test_the_configuration_is_valid_for_promtool(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool comes with Debian's prometheus")
    targets = tmp_path / "targets.json"
    targets.write_text("[]\n")
    (tmp_path / "prometheus.yml").write_text(configuration(targets, RULES_DIR))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
