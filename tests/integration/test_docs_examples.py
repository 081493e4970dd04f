"""Every example in docs/quickstart-agents.md runs, as written, against the real stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "quickstart-agents.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), re.S)
pytestmark = pytest.mark.guest


def environment(stack) -> dict[str, str]:
    config = yaml.safe_load(stack.config_path.read_text())
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        MVM_GATEWAY=stack.gateway_address,
        MVM_API_KEY=stack.admin_key,
        MVM_HTTP="http://" + config["gateway"]["http_listen"],
        PATH=f"{venv_bin}:{os.environ['PATH']}",
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{kind}" for i, (kind, _) in enumerate(BLOCKS)])
def test_quickstart_example_runs(stack, index):
    kind, code = BLOCKS[index]
    if kind == "json":
        json.loads(code)
        return
    if "node example.js" in code and shutil.which("node") is None:
        pytest.skip("node is not installed")
    command = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=REPO, env=environment(stack), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{kind} example failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the example printed nothing"
