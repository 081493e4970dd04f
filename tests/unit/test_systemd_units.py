"""The systemd units under deploy/systemd: one per service kind, each in its role's target, running the venv's
Python with the installation config, with the privileges its service needs; `systemd-analyze verify` clean."""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aetcd
import pytest
import yaml

from services.common.config import load_config, parse_address
from services.common.pki import KEK_FILE, ensure_pki, load_identity
from services.common.registry import etcd_client
from services.common.settings import SECTIONS
from tests.etcd import free_port

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


def unit_pki_dir() -> str:
    """Where the units' config keeps the PKI: <state_dir>/pki (no pki_dir)."""
    sections = yaml.safe_load((UNIT_DIR / "config.yaml").read_text())
    assert not sections.get("pki_dir")
    return f"{sections['state_dir']}/pki"


def etcd_unit() -> tuple[Path, list[str], dict[str, str], dict[str, str]]:
    """(unit file, ExecStart argv, ETCD_* environment, credential name -> file it is loaded from)."""
    path = UNIT_DIR / "microvm-etcd.service"
    env = dict(v.split("=", 1) for v in values(path, "Environment"))
    credentials = dict(v.split(":", 1) for v in values(path, "LoadCredential"))
    return path, parse(path)["Service"]["ExecStart"].split(), env, credentials


def test_etcd_serves_https_only_to_clients_of_the_ca_with_its_certificate_handed_over_as_credentials():
    path, argv, env, credentials = etcd_unit()
    assert "--client-cert-auth" in argv
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_ADVERTISE_CLIENT_URLS"].startswith("https://")
    # The dynamic user cannot enter the root-only PKI directory: systemd loads the three files for it.
    assert parse(path)["Service"]["DynamicUser"] == "yes"
    flags = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    assert (flags["--cert-file"], flags["--key-file"], flags["--trusted-ca-file"]) == (
        "%d/etcd.crt", "%d/etcd.key", "%d/ca.crt"
    )  # fmt: skip
    pki = unit_pki_dir()
    assert credentials == {name: f"{pki}/{name}" for name in ("etcd.crt", "etcd.key", "ca.crt")}


def test_only_auth_can_read_the_token_key_encryption_key():
    # Every unit runs as root: the key file's 0600 does not keep the others out, InaccessiblePaths= does.
    kek = f"{unit_pki_dir()}/{KEK_FILE}"
    for kind, path in service_units().items():
        assert parse(path)["Service"].get("User") is None, kind
        expected = [] if kind == "auth" else [f"-{kek}"]
        assert values(path, "InaccessiblePaths") == expected, kind


@pytest.mark.timeout(60)
async def test_the_etcd_unit_runs_an_etcd_that_admits_a_certificate_of_the_ca_and_refuses_clients_without_one(tmp_path):
    """The unit's command line and environment, run as systemd would (credentials copied to %d) by a real etcd on
    free loopback ports instead of 2379/2380."""
    _, argv, env, credentials = etcd_unit()
    pki = tmp_path / "pki"
    ensure_pki(pki)
    loaded = tmp_path / "credentials"
    loaded.mkdir()
    for name, source in credentials.items():
        (loaded / name).write_bytes((pki / Path(source).relative_to(unit_pki_dir())).read_bytes())
    port, peer = free_port(), free_port()
    ports = {"127.0.0.1:2379": f"127.0.0.1:{port}", "127.0.0.1:2380": f"127.0.0.1:{peer}"}
    for key, value in env.items():
        for fixed, free in ports.items():
            value = value.replace(fixed, free)
        env[key] = value
    env["ETCD_DATA_DIR"] = str(tmp_path / "data")
    assert all(fixed not in value for value in env.values() for fixed in ports)
    argv = [shutil.which("etcd") or "etcd", *(a.replace("%d", str(loaded)) for a in argv[1:])]
    process = subprocess.Popen(
        argv, env={"PATH": "/usr/bin:/bin", **env}, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "wb")
    )
    try:
        endpoint = f"127.0.0.1:{port}"
        operator = load_identity(pki, "operator")
        assert await writes_and_reads(etcd_client([endpoint], timeout=3, identity=operator)), (
            tmp_path / "etcd.log"
        ).read_text()[-2000:]
        # TLS without a client certificate is refused as well as a plain client.
        anonymous = dataclasses.replace(load_identity(pki, "operator"), key=None, certificate=None)
        assert not await writes_and_reads(etcd_client([endpoint], timeout=3, identity=anonymous), attempts=1)
        assert not await writes_and_reads(etcd_client([endpoint], timeout=3), attempts=1)
    finally:
        process.terminate()
        process.wait(10)


async def writes_and_reads(client, attempts: int = 40) -> bool:
    """True when the client wrote and read a key; False when etcd refused it (the TLS handshake) every time while
    starting (a fresh etcd takes a moment to elect itself)."""
    try:
        for _ in range(attempts):
            try:
                await client.connect()
                await client.put(b"/microvm/unit-probe", b"x")
                return (await client.get(b"/microvm/unit-probe")).value == b"x"
            except aetcd.exceptions.ConnectionFailedError:
                await client.close()
                await asyncio.sleep(0.1)
        return False
    finally:
        await client.close()
