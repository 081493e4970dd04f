"""`make bench` (issue 20): the unmodified E2B SDK on our gateway's E2B doors against our own SDK, in the same run
and the same stack (real guests):

- e2b_commands_run_true_p50: `sandbox.commands.run("true")` through the e2b SDK (control plane connect, then envd's
  Connect `process.Process/Start` on the traffic door), vs `Sandbox.exec(["true"])` through microvm_sandbox, both
  synchronous, alternating in the same sandbox. Goal: ratio <= 1.1. The e2b SDK runs every command as
  `/bin/bash -l -c CMD`, so a second row holds our exec of that same command line as the baseline: what the
  translation costs, with the login shell's start on both sides.
- e2b_create_to_first_output: `e2b.Sandbox.create()` then `commands.run("echo hello")` until it returns, vs
  `microvm_sandbox.Sandbox.create()` then `exec(["echo", "hello"])`; warm pool, alternating, the pool refilled
  between creates.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.run import emit, wait_for_warm_pool
from tests.stack import start_stack

CALLS = int(os.environ.get("MVM_BENCH_E2B_CALLS", "60"))
CREATES = int(os.environ.get("MVM_BENCH_E2B_CREATES", "4"))
REFILL_SECONDS = 5.0


def doors(config_path: Path) -> tuple[str, str]:
    gateway = yaml.safe_load(config_path.read_text())["gateway"]
    return "http://" + gateway["e2b_api_listen"], "http://" + gateway["e2b_sandbox_listen"]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-e2b-") as tmp:
        stack = start_stack(Path(tmp) / "stack")
        try:
            api, traffic = doors(stack.config_path)
            # The e2b SDK reads these when it is used, not when it is imported.
            os.environ.update(E2B_API_URL=api, E2B_SANDBOX_URL=traffic, E2B_API_KEY=stack.admin_key)
            run(stack)
        finally:
            stack.stop()


def run(stack) -> None:
    import e2b

    from microvm_sandbox import Sandbox

    wait_for_warm_pool(stack)
    ours = Sandbox.create(address=stack.gateway_address, api_key=stack.admin_key)
    theirs = e2b.Sandbox.connect(ours.id)
    for _ in range(5):
        ours.exec(["true"])
        theirs.commands.run("true")
    e2b_ms, our_ms, our_login_ms = [], [], []
    for _ in range(CALLS):
        started = time.perf_counter()
        theirs.commands.run("true")
        e2b_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        ours.exec(["true"])
        our_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        ours.exec(["/bin/bash", "-l", "-c", "true"])
        our_login_ms.append((time.perf_counter() - started) * 1000)
    e2b_p50 = statistics.median(e2b_ms)
    emit("e2b_commands_run_true_p50", e2b_p50, "ms", statistics.median(our_ms), "microvm_sandbox exec p50", "<= 1.1")
    emit(
        "e2b_commands_run_true_vs_same_command_p50",
        e2b_p50,
        "ms",
        statistics.median(our_login_ms),
        "microvm_sandbox exec of /bin/bash -l -c true p50",
        "<= 1.1",
    )
    ours.kill()

    e2b_firsts, our_firsts = [], []
    for _ in range(CREATES):
        wait_for_warm_pool(stack)
        started = time.perf_counter()
        sandbox = e2b.Sandbox.create()
        sandbox.commands.run("echo hello")
        e2b_firsts.append(time.perf_counter() - started)
        sandbox.kill()
        time.sleep(REFILL_SECONDS)
        wait_for_warm_pool(stack)
        started = time.perf_counter()
        own = Sandbox.create(address=stack.gateway_address, api_key=stack.admin_key)
        own.exec(["echo", "hello"])
        our_firsts.append(time.perf_counter() - started)
        own.kill()
        time.sleep(REFILL_SECONDS)
    emit(
        "e2b_create_to_first_output",
        statistics.median(e2b_firsts),
        "s",
        statistics.median(our_firsts),
        "microvm_sandbox create + first exec",
        "",
    )


if __name__ == "__main__":
    main()
