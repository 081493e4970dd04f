"""`make bench` (templates): what a user template costs, each figure beside a baseline from the same run.

- user_template_warm_create_p50: CreateSandbox + Exec(echo) until the first output byte for a template built
  here (pool size 1, like the default's pool in this stack), vs the same for `default`, alternating, with time
  for the pools to refill between creates. Goal of issue 15: ratio <= 1.1.
- template_noop_rebuild: the same build again (every layer cached: no builder VM boots), vs the first build.
  Goal: under 1 s.
- template_first_build: the first build (builder VMs per file-changing step, publish, template snapshot), with
  each step's time as rows `template_first_build_step_<n>`.
- python_template_first_build (and web_...): the built-in recipes' first builds as `make templates` recorded them
  (they need the Debian registry and PyPI; a benchmark talks only to 127.0.0.1), or a note that they were not.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from bench.run import emit, first_output_after_create
from microvm.sandbox.v1 import template_pb2 as tmpl
from microvm.sandbox.v1 import template_service_pb2 as tapi
from microvm.sandbox.v1 import template_service_pb2_grpc
from tests.guests import Gateway
from tests.stack import start_stack

ROUNDS = int(os.environ.get("MVM_BENCH_TEMPLATE_ROUNDS", "6"))
RECIPE = """\
from: default
env: {APP_MODE: bench}
workdir: /app
steps:
  - copy: {src: app.py, dest: /app/}
  - run: python3 -m py_compile app.py && echo ok > compiled.txt
pool_size: 1
"""
# Written by `make templates` (images/templates_build.py): the built-in recipes' first builds.
RECORD = Path(os.environ.get("MVM_CACHE_DIR") or Path.home() / ".cache" / "microvm") / "template-builds.json"


def context() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"print('hello from the app')\n"
        info = tarfile.TarInfo("app.py")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build(gateway: Gateway, name: str) -> tuple[float, tmpl.TemplateBuild]:
    stub = template_service_pb2_grpc.TemplateServiceStub(gateway.channel)

    def requests():
        yield tapi.BuildTemplateRequest(spec=tapi.BuildTemplateSpec(template=f"templates/{name}", recipe=RECIPE))
        yield tapi.BuildTemplateRequest(context=context())

    started, last = time.perf_counter(), None
    for event in stub.BuildTemplate(requests(), timeout=1800):
        if event.WhichOneof("event") == "build":
            last = event.build
    elapsed = time.perf_counter() - started
    if last is None or last.state != tmpl.TEMPLATE_BUILD_STATE_SUCCEEDED:
        raise SystemExit(f"bench template build failed: {last.failure_message if last else 'no build'}")
    return elapsed, last


def create_seconds(gateway: Gateway, template: str) -> float:
    seconds, sandbox = first_output_after_create(gateway, template=template)
    gateway.delete(sandbox.name)
    return seconds


def recorded_rows() -> None:
    """The built-in recipes' first builds as `make templates` recorded them."""
    try:
        recorded = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        recorded = {}
    if "python" not in recorded:
        note = f"run `make templates` first ({RECORD})"
        print(json.dumps({"metric": "python_template_first_build", "value": None, "note": note}))
    for name, build in sorted(recorded.items()):
        emit(f"{name}_template_first_build", build["seconds"], "s", goal=f"recorded {build['when']}")
        for step in build["steps"]:
            emit(f"{name}_template_step_{step['index']}", step["seconds"], "s", goal=step["text"][:80])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mvm-bench-templates-") as tmp:
        stack = start_stack(Path(tmp) / "stack", {"compute": {"warm_pool_size": 1}}, timeout=180)
        try:
            gateway = Gateway(stack.gateway_address, stack.admin_key)
            first, built = build(gateway, "bench-app")
            emit("template_first_build", first, "s")
            for index, step in enumerate(built.steps):
                emit(f"template_first_build_step_{index}", step.duration_ms / 1000, "s", goal=step.text[:80])
            noop, again = build(gateway, "bench-app")
            cached = all(s.state == tmpl.TEMPLATE_STEP_STATE_CACHED for s in again.steps)
            emit(
                "template_noop_rebuild",
                noop,
                "s",
                first,
                "template_first_build",
                "< 1 s" + ("" if cached else " (NOT all cached)"),
            )
            time.sleep(10)  # both pools filled
            user, default = [], []
            for _ in range(ROUNDS):
                default.append(create_seconds(gateway, "default"))
                time.sleep(3)
                user.append(create_seconds(gateway, "bench-app"))
                time.sleep(3)
            emit(
                "user_template_warm_create_p50",
                statistics.median(user),
                "s",
                statistics.median(default),
                "default_warm_create_p50",
                "ratio <= 1.1",
            )
        finally:
            stack.stop()
    recorded_rows()


if __name__ == "__main__":
    main()
