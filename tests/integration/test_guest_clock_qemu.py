"""A real guest's wall clock follows the host's (found by a new user: after a pooled or restored create the guest
was minutes behind, keeping its snapshot's time): after a warm create, a restore of an old snapshot and a resume
after a pause, the guest's `date` lies within 50 ms of the host's time around the exec that read it."""

from __future__ import annotations

import time

import pytest

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.integration.test_snapshots import restore, snapshot_of

pytestmark = pytest.mark.guest
GOAL_NS = 50_000_000


def assert_in_step(gateway, sandbox) -> None:
    before = time.time_ns()
    guest = int(gateway.exec(sandbox.name, ["date", "+%s%N"]).stdout)
    after = time.time_ns()
    # The guest read its clock somewhere in [before, after] of the host's time.
    assert before - GOAL_NS <= guest <= after + GOAL_NS, (
        f"guest clock off by {(guest - before) / 1e6:.1f}..{(guest - after) / 1e6:.1f} ms "
        f"(the exec took {(after - before) / 1e6:.1f} ms)"
    )


def test_the_guest_clock_is_the_hosts_after_create_restore_and_resume(gateway):
    sandbox = gateway.create()  # from the warm pool: a VM paused since the pool filled
    made = []
    try:
        assert_in_step(gateway, sandbox)
        snapshot = snapshot_of(gateway, sandbox)
        time.sleep(3)  # the snapshot's time falls behind
        restored = restore(gateway, snapshot)
        made.append(restored)
        assert_in_step(gateway, restored)
        gateway.stub.PauseSandbox(api.PauseSandboxRequest(name=sandbox.name), timeout=60)
        time.sleep(3)  # a paused guest's clock stands still
        gateway.stub.ResumeSandbox(api.ResumeSandboxRequest(name=sandbox.name), timeout=60)
        assert_in_step(gateway, sandbox)
        gateway.stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), timeout=60)
    finally:
        for other in [*made, sandbox]:
            gateway.delete(other.name)
