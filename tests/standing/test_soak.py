"""Soak (`make soak`, not part of `make test`): tests/load.py's mixed load against a real local stack for minutes,
sampling every few seconds the RSS and open fds of each of its processes, its TAP devices, its etcd keys and its VM
directories (tests/soak.py). Over the second half of the run each metric's least-squares slope must be flat (limits
in tests/soak.py), and once the load is gone and cleaned up, every count is back where it was before it began.

MVM_SOAK_SECONDS (default 600; `make soak SOAK=...`): how long the measured load runs; MVM_SOAK_SAMPLE_SECONDS
(default 5); MVM_SOAK_VMM (default fake): `auto`/`qemu` for real guests (images built by `make images`);
MVM_SOAK_WORKERS (default 4).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.load import running_stack
from tests.soak import run_soak
from tests.supervised import supervised_restarts

pytestmark = pytest.mark.soak


async def test_soak_resources_stay_flat_under_load():
    seconds = float(os.environ.get("MVM_SOAK_SECONDS", "600"))
    async with running_stack(os.environ.get("MVM_SOAK_VMM", "fake")) as stack:
        result = await run_soak(
            stack,
            seconds,
            every=float(os.environ.get("MVM_SOAK_SAMPLE_SECONDS", "5")),
            warmup=min(60.0, max(10.0, seconds / 10)),
            workers=int(os.environ.get("MVM_SOAK_WORKERS", "4")),
        )
        restarts = supervised_restarts(stack)
        series = stack.state_dir.parent / f"{stack.state_dir.name}-soak-samples.json"
        series.write_text(json.dumps(result.samples.taken))
        print("\nSOAK " + result.as_json(suite="soak", seconds=seconds, restarts=restarts, series=str(series)))
        assert result.tally.losses == dict.fromkeys(result.tally.losses, 0), result.tally.findings
        assert not any(restarts.values()), f"a process of the stack restarted during the soak: {restarts}"
        assert not result.too_steep, f"growing under steady load (per minute): {result.too_steep}"
        assert not result.not_returned, (
            f"not back to the baseline after the load (baseline, end): {result.not_returned}; "
            f"descriptors by kind: {result.fd_changes}"
        )
