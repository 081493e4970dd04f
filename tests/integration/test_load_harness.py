"""A short run of the standing suites' harness (tests/load.py, tests/soak.py; the suites themselves are `make chaos`
and `make soak`), so that it cannot rot unnoticed: the load does every kind of call and loses nothing, every process
of the stack is sampled, and what the load made is gone afterwards."""

from __future__ import annotations

from tests.load import running_stack
from tests.soak import run_soak
from tests.supervised import VICTIMS, supervised_restarts


async def test_load_harness_runs_samples_and_cleans_up():
    async with running_stack() as stack:
        result = await run_soak(stack, seconds=12, every=1, warmup=4, workers=2)
        print("\nLOAD HARNESS " + result.as_json())
        assert result.tally.losses == dict.fromkeys(result.tally.losses, 0), result.tally.findings
        done = set(result.tally.operations)
        assert {"create", "exec", "write", "read", "snapshot", "delete", "delete_snapshot"} <= done, done
        slopes = result.samples.slopes()
        assert {f"{name}.{metric}" for name in VICTIMS for metric in ("rss_mib", "fds")} <= set(slopes)
        assert {"taps", "etcd_keys", "audit_events", "vm_dirs"} <= set(slopes)
        assert result.baseline["vm_dirs"] >= 1 and result.end["etcd_keys"] > 0  # the warm pool's VM; registrations
        assert not result.not_returned, (result.not_returned, result.fd_changes)
        assert not any(supervised_restarts(stack).values())
