import os
import subprocess
import sys
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[2] / "clients" / "python"


@pytest.mark.timeout(300)
def test_sdk_passes_mypy_strict():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml", "src/microvm_sandbox"],
        cwd=SDK,
        capture_output=True,
        text=True,
        env=dict(os.environ, MYPYPATH=str(SDK.parents[1] / "gen" / "python")),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_egress_policy_parses_rules_with_ports_and_ipv6():
    from microvm.sandbox.v1 import sandbox_pb2
    from microvm_sandbox import InvalidArgumentError, egress_policy

    policy = egress_policy(allow=["203.0.113.0/24:80,443", "2001:db8::/32:53", "198.51.100.7/32"])
    assert policy.egress == sandbox_pb2.EGRESS_MODE_ALLOW_LIST
    assert [(r.cidr, list(r.ports)) for r in policy.allow] == [
        ("203.0.113.0/24", [80, 443]),
        ("2001:db8::/32", [53]),
        ("198.51.100.7/32", []),
    ]
    assert egress_policy("full").egress == sandbox_pb2.EGRESS_MODE_FULL
    assert egress_policy().egress == sandbox_pb2.EGRESS_MODE_NONE
    with pytest.raises(InvalidArgumentError):
        egress_policy("everything")
    with pytest.raises(InvalidArgumentError):
        egress_policy(allow=["10.0.0.0/8:http"])
