"""The systemd units under deploy/systemd: one per service kind, each in its role's target, running the venv's
Python with the installation config, with the privileges its service needs; `systemd-analyze verify` clean."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.config import load_config, parse_address
from services.common.settings import SECTIONS

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "deploy" / "systemd"
PYTHON = "/opt/microvm/.venv/bin/python"
CONFIG = "/etc/microvm/config.yaml"
ROLES = {
    "microvm-node.target": {"compute", "network", "relay", "snapshot"},
    "microvm-control.target": {"gateway", "auth"},
}
# The supervisor's all-in-one unit runs the same services differently; it is not one of the per-service units.
ALL_IN_ONE = "microvm-sandbox.service"


def parse(path: Path) -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once (values() reads those).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def values(path: Path, key: str) -> list[str]:
    """Every value of `key` in the unit (systemd keys may repeat; configparser keeps the last)."""
    return re.findall(rf"^{key}=(.*)$", path.read_text(), re.M)


def service_units() -> dict[str, Path]:
    """Kind -> unit file, from the module each per-service unit runs."""
    units: dict[str, Path] = {}
    for path in sorted(UNIT_DIR.glob("microvm-*.service")):
        match = re.fullmatch(r"\S+ -m services\.(\w+) .*", parse(path)["Service"]["ExecStart"])
        if path.name != ALL_IN_ONE and match:
            assert match[1] not in units, f"two units run {match[1]}: {units[match[1]].name}, {path.name}"
            units[match[1]] = path
    return units


def role_of(kind: str) -> str:
    (target,) = [target for target, kinds in ROLES.items() if kind in kinds]
    return target


def test_every_service_kind_has_exactly_one_unit_named_after_it():
    units = service_units()
    assert sorted(units) == sorted(kind for kind in SECTIONS if kind != "supervisor")
    assert all(path.name == f"microvm-{kind}.service" for kind, path in units.items())


def test_each_unit_runs_its_service_with_the_venv_python_and_the_config_and_restarts():
    for kind, path in service_units().items():
        service = parse(path)["Service"]
        assert service["ExecStart"] == f"{PYTHON} -m services.{kind} --config {CONFIG}"
        assert service["WorkingDirectory"] == "/opt/microvm"
        assert (service["Restart"], service["RestartSec"]) == ("always", "1")


def test_each_unit_is_wanted_by_and_part_of_its_role_target_which_wants_it():
    for kind, path in service_units().items():
        unit = parse(path)
        target = role_of(kind)
        assert unit["Unit"]["PartOf"] == target, path.name
        assert unit["Install"]["WantedBy"] == target, path.name
        assert path.name in parse(UNIT_DIR / target)["Unit"]["Wants"].split(), (target, path.name)
    etcd = parse(UNIT_DIR / "microvm-etcd.service")
    assert (etcd["Unit"]["PartOf"], etcd["Install"]["WantedBy"]) == ("microvm.target", "microvm.target")
    assert etcd["Service"]["ExecStart"].split()[0] == "/usr/bin/etcd"
    whole = parse(UNIT_DIR / "microvm.target")["Unit"]["Wants"].split()
    assert sorted(whole) == sorted(["microvm-etcd.service", *ROLES])
    for target in ROLES:
        assert parse(UNIT_DIR / target)["Unit"]["PartOf"] == "microvm.target"


def test_only_network_and_compute_keep_a_capability_and_only_compute_reaches_devices():
    for kind, path in service_units().items():
        service = parse(path)["Service"]
        expected = "CAP_NET_ADMIN" if kind in ("network", "compute") else ""
        assert service["CapabilityBoundingSet"] == expected, kind
        assert service["NoNewPrivileges"] == "yes"
        devices = values(path, "DeviceAllow")
        assert devices == (["/dev/kvm rw", "/dev/net/tun rw"] if kind == "compute" else []), kind


def test_only_compute_leaves_its_children_running_when_it_stops():
    # The VMM processes must outlive a compute restart; every other service is stopped whole.
    for kind, path in service_units().items():
        assert parse(path)["Service"].get("KillMode") == ("process" if kind == "compute" else None), kind


def test_example_config_loads_and_the_advertised_ports_are_the_listen_ports():
    config = UNIT_DIR / "config.yaml"
    sections = yaml.safe_load(config.read_text())
    for kind, path in service_units().items():
        load_config(str(config), kind, SECTIONS[kind], environ={})
        (advertised,) = [
            v.partition("=")[2] for v in values(path, "Environment") if v.startswith(f"MVM_{kind.upper()}_ADVERTISE")
        ]
        assert advertised.endswith(":" + str(parse_address(sections[kind]["listen"], key="listen")[1])), kind


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this venv's Python and any etcd (or true), the
    # rest of each unit is verified as written.
    etcd = shutil.which("etcd") or shutil.which("true")
    files = []
    for path in sorted([*UNIT_DIR.glob("microvm-*.service"), *UNIT_DIR.glob("*.target")]):
        if path.name == ALL_IN_ONE:
            continue
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(PYTHON, sys.executable).replace("/usr/bin/etcd", etcd))
        files.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
