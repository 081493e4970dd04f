"""The Prometheus rules under deploy/prometheus: valid for promtool (Prometheus 2.42, Debian's `prometheus`), and
every recording rule's value and every alert's firing and not firing as its unit tests expect."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules" / "microvm.rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "microvm.rules.test.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package: make apt)"
)


def promtool(*args: str) -> None:
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def test_rule_files_pass_promtool_check():
    promtool("check", "rules", str(RULES))


def test_recording_rules_and_alerts_behave_as_their_unit_tests_say():
    promtool("test", "rules", str(RULE_TESTS))
