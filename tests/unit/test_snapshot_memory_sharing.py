"""VmSnapshots._share_memory (services/compute/snapshots.py): when a snapshot's migration stream becomes a RAM file
its restores map copy-on-write. The driver is a recording stand-in; the real conversion is QEMU's, exercised by the
fork tests against real guests (tests/integration/test_snapshots.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from images.builder import BuiltImage
from microvm.types.v1 import vm_pb2
from microvm.types.v1.snapshot_pb2 import SnapshotRecord
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import DataLoss
from services.common.records import SNAPSHOTS, Records
from services.common.settings import ComputeSettings
from services.compute import snapshot_upkeep
from services.compute import snapshots as snapshots_module
from services.compute.ledger import VmLedger
from services.compute.qemu import QemuDriver
from services.compute.server import ComputeNode
from services.compute.snapshots import VmSnapshots

CONFIG = {"template": "default", "vcpus": 1, "memory_mib": 256, "boot_hostname": "src", "network": True}


class RecordingDriver:
    """Makes the shared form as QEMU's driver does (`ram`, then `devices.bin`), or fails when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Path, object, Path]] = []
        self.fail = fail

    async def share_memory(self, frozen: Path, vm, image, work: Path) -> bool:
        self.calls.append((frozen, vm, work))
        await asyncio.sleep(0.05)  # restores arriving meanwhile wait for it
        if self.fail:
            raise RuntimeError("qemu failed to start: no such device")
        (frozen / "ram").write_bytes(b"\0" * 16)
        (frozen / "devices.bin").write_bytes(b"state")
        return True


def snapshots(tmp_path: Path, driver: RecordingDriver) -> tuple[VmSnapshots, Path, BuiltImage]:
    lifecycle = SimpleNamespace(
        ledger=VmLedger(None, "node-1", ComputeSettings()), driver=driver, ram_root=tmp_path / "ram"
    )
    frozen = tmp_path / "snapshots" / "snap-1"
    frozen.mkdir(parents=True)
    (frozen / "memory.bin").write_bytes(b"stream")
    image = BuiltImage("default", tmp_path, tmp_path / "k", tmp_path / "b", tmp_path / "i", tmp_path / "r", {})
    return VmSnapshots(lifecycle, tmp_path / "snapshots"), frozen, image


async def test_the_first_restore_loads_the_stream_and_the_second_shares_the_memory_once(tmp_path):
    driver = RecordingDriver()
    vm_snapshots, frozen, image = snapshots(tmp_path, driver)
    await vm_snapshots._share_memory(frozen, "snap-1", CONFIG, image)
    assert driver.calls == []  # a lone restore (a migration) never waits for it
    await asyncio.gather(*(vm_snapshots._share_memory(frozen, "snap-1", CONFIG, image) for _ in range(5)))
    assert len(driver.calls) == 1 and (frozen / "devices.bin").exists() and (frozen / "ram").exists()
    _, helper, work = driver.calls[0]
    # The helper VM has the snapshot's size and a NIC (its device state has one), and works in its own directory,
    # gone afterwards.
    assert (helper.vcpus, helper.memory_mib, helper.boot_hostname) == (1, 256, "src")
    assert helper.nic.tap_device and helper.nic.mac_address
    assert work.parent == frozen.parent and not work.exists()


@pytest.mark.parametrize("network", [True, False])
async def test_a_failure_to_share_leaves_the_stream_and_every_restore_goes_on(tmp_path, network):
    driver = RecordingDriver(fail=True)
    vm_snapshots, frozen, image = snapshots(tmp_path, driver)
    await vm_snapshots._share_memory(frozen, "snap-1", {**CONFIG, "network": network}, image)
    await asyncio.gather(
        *(vm_snapshots._share_memory(frozen, "snap-1", {**CONFIG, "network": network}, image) for _ in range(4))
    )
    assert len(driver.calls) == 1  # tried once, nothing raised, and not again: the other restores do not queue
    assert bool(driver.calls[0][1].nic.tap_device) == network
    assert sorted(p.name for p in frozen.parent.iterdir()) == ["snap-1"]  # no work directory left behind
    assert sorted(p.name for p in frozen.iterdir()) == ["memory.bin"]


async def test_prune_forgets_the_restores_of_a_snapshot_it_drops(tmp_path):
    vm_snapshots, frozen, _ = snapshots(tmp_path, RecordingDriver())
    vm_snapshots.restores["snap-1"] = 3
    assert await snapshot_upkeep.prune(vm_snapshots, set()) == ["snap-1"]
    assert not frozen.exists() and vm_snapshots.restores == {}


async def test_prune_keeps_what_a_record_a_vm_or_a_snapshot_in_the_making_needs_and_drops_the_rest(tmp_path):
    vm_snapshots, frozen, _ = snapshots(tmp_path, RecordingDriver())
    root = frozen.parent
    ages = {
        "snap-recorded": 700,
        "snap-cloned": 700,
        "snap-just-taken": 60,
        ".snap-crashed.partial": 4000,
        ".snap-uploading.partial": 700,
        "snap-1": 700,
    }
    for name, age in ages.items():
        (root / name).mkdir(exist_ok=True)
        os.utime(root / name, (time.time() - age, time.time() - age))
    vm_snapshots.ledger.vms["clone"] = VmRecord(id="clone", source_snapshot="snap-cloned")
    dropped = await snapshot_upkeep.prune(vm_snapshots, {"snap-recorded"}, min_age_seconds=600)
    assert sorted(dropped) == [".snap-crashed.partial", "snap-1"]
    assert sorted(p.name for p in root.iterdir()) == [
        ".snap-uploading.partial",
        "snap-cloned",
        "snap-just-taken",
        "snap-recorded",
    ]


async def test_a_fork_shares_the_memory_before_its_first_clone_instead_of_loading_the_stream_too(tmp_path):
    driver = RecordingDriver()
    vm_snapshots, frozen, image = snapshots(tmp_path, driver)
    # A fork's clones arrive together, each told more follow: the first waits for the file like the others.
    await asyncio.gather(
        *(vm_snapshots._share_memory(frozen, "snap-1", CONFIG, image, more_follow=True) for _ in range(3))
    )
    assert len(driver.calls) == 1 and (frozen / "devices.bin").exists()


@pytest.mark.parametrize("tmpfs", [True, False])
async def test_the_helper_loads_the_ram_in_memory_when_the_ram_directory_is_tmpfs_and_it_fits(
    tmp_path, monkeypatch, tmpfs
):
    monkeypatch.setattr(snapshots_module, "on_tmpfs", lambda path: tmpfs)
    driver = RecordingDriver()
    vm_snapshots, frozen, image = snapshots(tmp_path, driver)
    await vm_snapshots._share_memory(frozen, "snap-1", CONFIG, image, more_follow=True)
    helper = driver.calls[0][1]
    assert helper.ram_path == (str(tmp_path / "ram" / "share-snap-1.ram") if tmpfs else "")
    # A guest too large for a quarter of the host's available memory loads straight into the snapshot.
    monkeypatch.setattr(snapshots_module, "available_memory_kib", lambda: 4 * 256 * 1024 - 1)
    assert vm_snapshots._loading_place("snap-2", 256) == ""


class ForkSnapshotDriver(RecordingDriver):
    """Freezes a stream snapshot; its share_memory waits until an upload has begun (see the test below)."""

    machine, boot_args = "microvm", "console=ttyS0"

    def __init__(self, upload_began: asyncio.Event, share_began: asyncio.Event) -> None:
        super().__init__()
        self.upload_began, self.share_began = upload_began, share_began

    async def snapshot(self, vm, out: Path, base_image: Path) -> str:
        (out / "memory.bin").write_bytes(b"stream")
        (out / "disk.qcow2").write_bytes(b"disk")
        return "stream"

    async def share_memory(self, frozen: Path, vm, image, work: Path) -> bool:
        self.share_began.set()
        await self.upload_began.wait()
        return await super().share_memory(frozen, vm, image, work)


def fork_source(tmp_path: Path, monkeypatch, upload) -> tuple[VmSnapshots, ForkSnapshotDriver]:
    upload_began, share_began = asyncio.Event(), asyncio.Event()
    driver = ForkSnapshotDriver(upload_began, share_began)
    vm_snapshots, _, image = snapshots(tmp_path, driver)
    monkeypatch.setattr(snapshots_module, "BuiltImage", SimpleNamespace(at=lambda directory: image))
    monkeypatch.setattr(snapshots_module, "upload", lambda *args: upload(upload_began, share_began, *args))
    vm_snapshots.ledger.vms["src"] = VmRecord(id="src", template="default", state=vm_pb2.VM_STATE_RUNNING, vcpus=1)
    return vm_snapshots, driver


async def test_a_fork_snapshot_shares_its_stream_while_its_files_upload(tmp_path, monkeypatch):
    async def upload(upload_began, share_began, store, snapshot_id, name, path):
        upload_began.set()
        await share_began.wait()  # one after the other, either way round, would never get past here
        return path.stat().st_size

    vm_snapshots, driver = fork_source(tmp_path, monkeypatch, upload)
    total = await asyncio.wait_for(vm_snapshots.snapshot("src", "snap-fork", store=None, share_memory=True), 10)
    frozen = tmp_path / "snapshots" / "snap-fork"
    assert total == sum((frozen / name).stat().st_size for name in ("memory.bin", "disk.qcow2", "config.json"))
    assert {"memory.bin", "ram", "devices.bin"} <= {p.name for p in frozen.iterdir()}
    assert len(driver.calls) == 1 and driver.calls[0][0].name == ".snap-fork.partial"  # before it was final


async def test_an_upload_that_fails_beside_the_sharing_fails_the_snapshot_with_its_own_error(tmp_path, monkeypatch):
    async def upload(upload_began, share_began, store, snapshot_id, name, path):
        upload_began.set()
        raise DataLoss("the store kept another size", reason="ARTIFACT_SIZE_MISMATCH")

    vm_snapshots, _ = fork_source(tmp_path, monkeypatch, upload)
    with pytest.raises(DataLoss):
        await asyncio.wait_for(vm_snapshots.snapshot("src", "snap-fork", store=None, share_memory=True), 10)
    assert list((tmp_path / "snapshots").iterdir()) == [tmp_path / "snapshots" / "snap-1"]  # nothing left behind


async def test_the_node_prunes_its_copies_against_the_snapshot_records_in_etcd(tmp_path, etcd):
    vm_snapshots, frozen, _ = snapshots(tmp_path, RecordingDriver())
    (frozen.parent / "snap-unit-recorded").mkdir()
    records = Records(etcd)
    await records.put(SNAPSHOTS, SnapshotRecord(id="snap-unit-recorded", template="default"), "snap-unit-recorded")
    try:
        node = SimpleNamespace(ledger=SimpleNamespace(records=records, vms={}), snapshots=vm_snapshots)
        assert await ComputeNode.prune_snapshot_copies(node, min_age_seconds=0) == ["snap-1"]
        assert [p.name for p in frozen.parent.iterdir()] == ["snap-unit-recorded"]
    finally:
        await records.delete(SNAPSHOTS, "snap-unit-recorded")


def test_a_share_helper_left_running_by_a_crash_is_killed_at_start(tmp_path):
    class Driver(RecordingDriver):
        paths = staticmethod(QemuDriver.paths)

        @staticmethod
        def owns_process(pid: int, directory: Path) -> bool:
            return str(directory / "qmp.sock").encode() in Path(f"/proc/{pid}/cmdline").read_bytes()

    vm_snapshots, frozen, _ = snapshots(tmp_path, Driver())
    work = frozen.parent / ".snap-1.share"
    work.mkdir()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(work / "qmp.sock")])
    (work / "vmm.pid").write_text(str(helper.pid))
    for _ in range(500):  # a process just started shows its command line once its exec is through
        if Driver.owns_process(helper.pid, work):
            break
        time.sleep(0.01)
    stray = frozen.parent / ".snap-2.share"  # its helper never started
    stray.mkdir()
    try:
        assert snapshot_upkeep.reap_leftover_helpers(vm_snapshots) == 1
        assert helper.wait(10) == -signal.SIGKILL
        assert not work.exists() and not stray.exists() and frozen.exists()
    finally:
        helper.kill()
