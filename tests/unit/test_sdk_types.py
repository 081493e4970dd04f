import os
import subprocess
import sys
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[2] / "clients" / "python"


@pytest.mark.timeout(300)
def test_sdk_passes_mypy_strict():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml",
                             "src/microvm_sandbox"], cwd=SDK, capture_output=True, text=True,
                            env=dict(os.environ, MYPYPATH=str(SDK.parents[1] / "gen" / "python")))
    assert result.returncode == 0, result.stdout + result.stderr
