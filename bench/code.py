"""`make bench` / `make bench-code` (issue 16): the code interpreter on the running installation (`make up`, then
`make templates` builds `code-interpreter`; its build needs the Debian registry, so no bench stack builds it).
Raw gRPC through the installation's gateway on 127.0.0.1, each figure beside a baseline from the same run and the
same sandboxes:

- code_first_run_after_create: CreateSandbox(code-interpreter) + RunCode("1+1") until its result, vs
  CreateSandbox(code-interpreter) + Exec(echo) until the first output byte. Goal: ratio <= 1.5 (the kernel is
  already running inside the template snapshot).
- run_code_p50 / _p90: RunCode("1+1") until `end` in a ready sandbox, vs Exec(`true`) until `exited` in the same
  sandbox, alternating. Goal: p50 within +10 ms of exec's.
- run_code_plot: a matplotlib line plot until its result (PNG and chart), for scale.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from bench import installation as running
from bench.run import emit, percentile
from microvm.sandbox.v1 import code_service_pb2 as code_api
from microvm.sandbox.v1 import code_service_pb2_grpc

TEMPLATE = os.environ.get("MVM_BENCH_CODE_TEMPLATE", "code-interpreter")
CREATES = int(os.environ.get("MVM_BENCH_CODE_CREATES", "5"))
CALLS = int(os.environ.get("MVM_BENCH_CODE_CALLS", "60"))
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [2, 4, 8])\nplt.show()"


class Installation(running.Installation):
    def __init__(self) -> None:
        super().__init__(TEMPLATE)
        self.code = code_service_pb2_grpc.CodeServiceStub(self.channel)

    def run_code(self, name: str, code: str) -> tuple[float, float]:
        """Seconds until the first result, and until `end`."""
        started, first = time.perf_counter(), None
        request = code_api.RunCodeRequest(sandbox=name, code=code)
        for event in self.code.RunCode(request, metadata=self.metadata, timeout=300):
            kind = event.WhichOneof("event")
            if kind == "result" and first is None:
                first = time.perf_counter() - started
            if kind == "error":
                raise SystemExit(f"bench code failed: {event.error.name}: {event.error.value}")
        return first or 0.0, time.perf_counter() - started


def first_calls(installation: Installation) -> tuple[list[float], list[float]]:
    code, exec_ = [], []
    for _ in range(CREATES):
        for runs, call in ((code, "code"), (exec_, "exec")):
            started = time.perf_counter()
            name = installation.create()
            if call == "code":
                installation.run_code(name, "1+1")
            else:
                installation.exec(name, ["echo", "hello"])
            runs.append(time.perf_counter() - started)
            installation.delete(name)
            time.sleep(5)  # the pool refills between creates, as for every warm create figure
    return code, exec_


def unavailable() -> str:
    return running.unavailable(TEMPLATE)


def main() -> None:
    why = unavailable()
    if why:
        for metric in ("code_first_run_after_create", "run_code_p50"):
            print(json.dumps({"metric": metric, "value": None, "note": why}), flush=True)
        return
    installation = Installation()
    code_firsts, exec_firsts = first_calls(installation)
    emit(
        "code_first_run_after_create",
        statistics.median(code_firsts),
        "s",
        statistics.median(exec_firsts),
        "first_exec_after_create",
        "ratio <= 1.5",
    )
    name = installation.create()
    try:
        installation.run_code(name, "1+1")
        installation.exec(name, ["true"])
        code, exec_ = [], []
        for _ in range(CALLS):
            code.append(installation.run_code(name, "1+1")[1])
            exec_.append(installation.exec(name, ["true"])[1])
        code_p50, exec_p50 = statistics.median(code) * 1000, statistics.median(exec_) * 1000
        emit("run_code_p50", code_p50, "ms", exec_p50, "exec_true_p50", f"<= baseline + 10 ms ({exec_p50 + 10:.1f})")
        emit("run_code_p90", percentile(code, 0.9) * 1000, "ms", percentile(exec_, 0.9) * 1000, "exec_true_p90")
        plots = [installation.run_code(name, PLOT)[0] for _ in range(5)]
        emit("run_code_plot", statistics.median(plots) * 1000, "ms", code_p50, "run_code_p50")
    finally:
        installation.delete(name)


if __name__ == "__main__":
    main()
