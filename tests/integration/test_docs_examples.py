"""Every example in README.md and docs/*.md runs, as written, against a real stack.

A fenced block is run by its language tag: `sh`/`bash`/`shell` with `bash -euo pipefail` and `python` with
the venv's interpreter, from the checkout, each with a fresh shell; `json` is parsed. Any other tag (`text`,
`yaml`, `toml`, ...) marks output or configuration, which is not run; a block without a tag is refused, so
nothing executable goes untested by accident. A comment right before a block changes that:

- `<!-- not run: REASON -->`: the block needs what the test stack does not have (systemd, KVM, networking,
  a second host...). The reason is required.
- `<!-- setup -->`: the document's setup block, which a reader runs once in their shell before the others.
  It runs once per document here (its own test), and the variables it assigns are handed to every later block
  of that document. A sandbox it names in `ID` is deleted at the end.
- `<!-- needs networking -->`: the block runs against a second stack with sandbox networking on, inside a
  network namespace of its own (tests/netns.py; root only), after the document's setup block ran there too.

What the test provides, as `make up` and an activated venv (`. .venv/bin/activate`) would:
- `HOME` with `~/.microvm` being the test stack's state dir (so `~/.microvm/admin.key` is its admin key) and
  `MVM_STATE_DIR` pointing there too; no `MVM_API_KEY` (blocks set it or the SDK reads the key file);
- `MVM_GATEWAY` (gRPC) and `MVM_HTTP` (HTTP/JSON base URL): the test stack listens on free ports, not on
  `make up`'s 127.0.0.1:50051 and :8080, so blocks write `${MVM_GATEWAY:-127.0.0.1:50051}` and
  `${MVM_HTTP:-http://127.0.0.1:8080}`; the E2B doors likewise (`MVM_E2B_API_URL`, `MVM_E2B_SANDBOX_URL`);
  `MVM_ETCD_ENDPOINTS` (etcd, not on 127.0.0.1:2379) and `MVM_SUPERVISOR_ETCD_CLIENT_PORT` (so
  `mvm-supervisor status` finds it);
- the venv's `bin` first on PATH (`mvm`, `grpcurl`, `python`).
A block must exit 0 and print something.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell"}
RUN = SHELLS | {"python", "json"}
FENCE = re.compile(
    r"(?:<!--\s*(?P<note>[^>]*?)\s*-->[ \t]*\n(?:[ \t]*\n)?)?^(?P<indent>[ \t]*)```(?P<kind>[\w+-]*)[^\n]*\n"
    r"(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
ASSIGNED = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", re.M)

pytestmark = pytest.mark.guest


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int
    kind: str
    code: str
    note: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}-{self.kind or 'untagged'}"

    @property
    def setup(self) -> bool:
        return self.note == "setup"

    @property
    def not_run(self) -> bool:
        return self.note.startswith("not run")

    @property
    def networked(self) -> bool:
        return self.note == "needs networking"

    @property
    def runs(self) -> bool:
        return self.kind in RUN and not self.not_run


def snippets(doc: Path) -> list[Snippet]:
    text = doc.read_text()
    return [
        Snippet(
            doc,
            text.count("\n", 0, m.start("kind")) + 1,
            m.group("kind"),
            re.sub(rf"^{m.group('indent')}", "", m.group("code"), flags=re.M),
            m.group("note") or "",
        )
        for m in FENCE.finditer(text)
    ]


ALL = [snippet for doc in DOCS for snippet in snippets(doc)]
RUNNABLE = [snippet for snippet in ALL if snippet.runs]


def test_every_block_says_whether_it_runs():
    problems = []
    for snippet in ALL:
        if not snippet.kind:
            problems.append(f"{snippet.id}: no language tag (```sh to run it, ```text for output)")
        elif snippet.not_run and not re.match(r"not run:\s*\S", snippet.note):
            problems.append(f"{snippet.id}: `<!-- not run: REASON -->` needs its reason")
        elif snippet.setup and snippet.kind not in SHELLS:
            problems.append(f"{snippet.id}: a setup block is a shell block")
        elif snippet.note and not (snippet.setup or snippet.not_run or snippet.networked):
            problems.append(f"{snippet.id}: unknown note {snippet.note!r} (setup, needs networking, not run: REASON)")
    for doc in DOCS:
        if sum(s.setup for s in snippets(doc)) > 1:
            problems.append(f"{doc.relative_to(REPO)}: more than one setup block")
    assert not problems, "\n".join(problems)


def test_http_api_doc_lists_every_route():
    """docs/http-api.md's route table has a row for every HTTP route the gateway serves, and no other."""
    from services.gateway.http import routes

    def readable(template: str) -> str:  # /v1/{name=sandboxes/*}:pause -> /v1/sandboxes/{id}:pause
        template = re.sub(r"\{[a-z_.]+=templates/\*/builds/\*\}", "templates/{id}/builds/{build}", template)
        return re.sub(
            r"\{[a-z_.]+=([a-z]+)/\*\}", lambda m: f"{m[1]}/{{{'node' if m[1] == 'nodes' else 'id'}}}", template
        )

    served = {(route.verb, readable(route.template), route.method.name) for route in routes()}
    rows = re.findall(
        r"^\| (GET|POST|PATCH|DELETE) \| `([^`]+)` \| (\w+)", (REPO / "docs/http-api.md").read_text(), re.M
    )
    assert set(rows) == served, f"missing: {sorted(served - set(rows))}; not served: {sorted(set(rows) - served)}"


class DocsStack:
    """A stack as the examples see it: a HOME whose ~/.microvm is its state dir, its addresses in the environment,
    and for a stack inside a network namespace, every command run in there. Each document's setup block runs
    once per stack; later blocks get the variables it assigned."""

    def __init__(self, stack, home: Path, namespace: str | None = None) -> None:
        self.stack, self.home, self.namespace = stack, home, namespace
        (home / ".microvm").symlink_to(stack.state_dir)
        self.setups: dict[Path, dict[str, str] | BaseException] = {}

    def environment(self) -> dict[str, str]:
        config = yaml.safe_load(self.stack.config_path.read_text())
        venv_bin = str(Path(sys.executable).parent)
        env = dict(
            os.environ,
            HOME=str(self.home),
            MVM_STATE_DIR=str(self.stack.state_dir),
            MVM_GATEWAY=self.stack.gateway_address,
            MVM_HTTP="http://127.0.0.1:" + config["gateway"]["http_listen"].rpartition(":")[2],
            # the E2B doors (docs/e2b.md), on free ports too rather than make up's :3000 and :3001
            MVM_E2B_API_URL="http://" + config["gateway"]["e2b_api_listen"],
            MVM_E2B_SANDBOX_URL="http://" + config["gateway"]["e2b_sandbox_listen"],
            MVM_ETCD_ENDPOINTS=self.stack.etcd_endpoint,
            # `mvm-supervisor status` finds its etcd by the supervisor's port (make up's: 2379).
            MVM_SUPERVISOR_ETCD_CLIENT_PORT=self.stack.etcd_endpoint.rpartition(":")[2],
            PATH=f"{venv_bin}:{os.environ['PATH']}",
            VIRTUAL_ENV=str(Path(venv_bin).parent),
            # npm keeps its cache under HOME: keep the real one, so `npm ci` needs no network.
            npm_config_cache=os.environ.get("npm_config_cache", str(Path.home() / ".npm")),
        )
        env.pop("MVM_API_KEY", None)
        return env

    def run(self, code: str, kind: str = "sh", variables: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        command = ["python", "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
        if self.namespace:
            command = ["ip", "netns", "exec", self.namespace, *command]
        env = {**self.environment(), **(variables or {})}
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    def variables(self, doc: Path) -> dict[str, str]:
        """What `doc`'s setup block assigned (run now, the first time it is asked)."""
        setup = next((s for s in snippets(doc) if s.setup), None)
        if setup is None:
            return {}
        if doc not in self.setups:
            self.setups[doc] = self._run_setup(setup)
        outcome = self.setups[doc]
        if isinstance(outcome, BaseException):
            pytest.fail(f"the setup block of {doc.relative_to(REPO)} failed: {outcome}")
        return outcome

    def _run_setup(self, setup: Snippet) -> dict[str, str] | BaseException:
        names = sorted(set(ASSIGNED.findall(setup.code)))
        dump = self.home / f"setup-{setup.doc.stem}.vars"
        dump.write_bytes(b"")
        printf = "".join(f'\nprintf "%s\\0%s\\0" {name} "${{{name}-}}" >>"{dump}"' for name in names)
        result = self.run(setup.code + printf)
        if result.returncode != 0:
            return RuntimeError(f"exit {result.returncode}\n{setup.code}\n{result.stdout}\n{result.stderr}")
        fields = dump.read_text().split("\0")[:-1]
        return dict(zip(fields[::2], fields[1::2], strict=True))

    def clean_up(self) -> None:
        """Deletes the sandboxes the setup blocks made (`ID`)."""
        for outcome in self.setups.values():
            if isinstance(outcome, dict) and outcome.get("ID"):
                self.run(f"mvm rm {outcome['ID']}", variables=outcome)


@pytest.fixture(scope="session")
def docs_stack(stack, tmp_path_factory):
    docs = DocsStack(stack, tmp_path_factory.mktemp("docs-home"))
    yield docs
    docs.clean_up()


@pytest.fixture(scope="session")
def networked_docs_stack(tmp_path_factory):
    """A stack with sandbox networking, in a network namespace of its own (tests/netns.py), for the blocks
    marked `<!-- needs networking -->`; made only when one of them runs."""
    if os.geteuid() != 0:
        pytest.skip("sandbox networking runs in a network namespace, which needs root")
    from tests.netns import NetnsLab
    from tests.stack import start_stack

    lab = NetnsLab.create()
    stack = None
    try:
        stack = start_stack(
            tmp_path_factory.mktemp("docs-netns-stack"), {"networking": True}, timeout=120, netns=lab.node
        )
        docs = DocsStack(stack, tmp_path_factory.mktemp("docs-netns-home"), namespace=lab.node)
        yield docs
        docs.clean_up()
    finally:
        if stack is not None:
            stack.stop()
        lab.destroy()


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_doc_example_runs(request, snippet):
    if snippet.kind == "json":
        json.loads(snippet.code)
        return
    if "node example.js" in snippet.code and shutil.which("node") is None:
        pytest.skip("node is not installed")
    docs = request.getfixturevalue("networked_docs_stack" if snippet.networked else "docs_stack")
    variables = docs.variables(snippet.doc)
    if snippet.setup:
        assert variables or snippet.code.strip(), "the setup block assigned nothing"
        return
    result = docs.run(snippet.code, snippet.kind, variables)
    assert result.returncode == 0, (
        f"{snippet.id} failed (exit {result.returncode}):\n{snippet.code}\n{result.stdout}\n{result.stderr}"
    )
    assert result.stdout.strip(), f"{snippet.id} printed nothing"
