"""`make templates`: builds the built-in template recipes (images/templates/<name>/mvm.yaml: `python`, `web`,
`code-interpreter`) on the running installation, through its public API like any user's template, as public
templates (the admin key `make up` wrote). Each recipe's base first (`web` is built on `python`). A recipe whose
plan is unchanged is a cache hit (its last image is reused), so running it again costs seconds. Step times of each
first build are kept in $MVM_CACHE_DIR/template-builds.json for `make bench`.

    python -m images.templates_build [NAME...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "images" / "templates"
RECORD = Path(os.environ.get("MVM_CACHE_DIR") or Path.home() / ".cache" / "microvm") / "template-builds.json"


def recipes() -> dict[str, Path]:
    return {path.parent.name: path for path in sorted(RECIPES.glob("*/mvm.yaml"))}


def in_order(wanted: list[str], found: dict[str, Path]) -> list[str]:
    """`wanted` with each recipe's base (when it is one of ours) before it."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        base = str(yaml.safe_load(found[name].read_text()).get("from", "")).split(":")[0]
        if base in found and base != name:
            visit(base)
        ordered.append(name)

    for name in wanted:
        visit(name)
    return ordered


def main(argv: list[str] | None = None) -> int:
    from microvm_sandbox import Client, Template
    from microvm_sandbox.errors import ConflictError, TemplateBuildFailed

    found = recipes()
    parser = argparse.ArgumentParser(prog="python -m images.templates_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"recipes to build (default: all of {', '.join(found)})")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(found)
    if unknown:
        parser.error(f"no recipe {', '.join(sorted(unknown))} in {RECIPES}")
    client = Client()
    try:
        record = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        record = {}
    for name in in_order(args.names or list(found), found):
        try:
            client.templates.create(name, public=True, description=f"built-in recipe images/templates/{name}")
        except ConflictError:  # made by an earlier run
            pass
        print(f"--- template {name}", flush=True)
        started = time.monotonic()

        def on_log(log) -> None:
            sys.stdout.write(log.data.decode(errors="replace"))
            sys.stdout.flush()

        try:
            build = client.templates.build(Template.from_recipe(found[name], name=name), on_log=on_log)
        except TemplateBuildFailed as failed:
            print(f"template {name} failed: {failed.failure_reason}: {failed.failure_message}", file=sys.stderr)
            return 1
        seconds = time.monotonic() - started
        reused = all(step.duration_ms == 0 for step in build.steps)
        print(f"--- template {name}: {build.name} in {seconds:.1f}s{' (unchanged)' if reused else ''}")
        if not reused:
            record[name] = {
                "build": build.name,
                "seconds": round(seconds, 1),
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "steps": [
                    {"index": i, "text": s.text, "seconds": s.duration_ms / 1000} for i, s in enumerate(build.steps)
                ],
            }
            RECORD.parent.mkdir(parents=True, exist_ok=True)
            RECORD.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
