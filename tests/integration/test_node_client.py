"""A client in a second language: the Node.js example, generated from protos/, against the real stack."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[2] / "clients" / "node"
pytestmark = pytest.mark.guest


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example_creates_streams_and_deletes(stack):
    if not (NODE / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE, check=True, timeout=300, capture_output=True)
    result = subprocess.run(
        ["node", "example.js"],
        cwd=NODE,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, MVM_GATEWAY=stack.gateway_address, MVM_API_KEY=stack.admin_key),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("created sandboxes/")
    assert lines[1:5] == ["line 1", "line 2", "line 3", "Linux"]
    assert lines[5] == "exit code 0" and lines[6].startswith("deleted sandboxes/")
