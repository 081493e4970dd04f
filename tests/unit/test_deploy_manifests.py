"""The Kubernetes manifests under deploy/kubernetes: valid for a pinned Kubernetes, and in step with the image,
the config schema, the ports in the ConfigMap and the exec probe."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import aetcd
import kubernetes_validate
import pytest
import yaml

from services.common.config import CommonSettings, load_config, parse_address
from services.common.pki import ensure_pki, load_identity
from services.common.registry import etcd_client
from services.common.settings import SECTIONS
from tests.etcd import free_port

# The Kubernetes release the manifests are written for (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.33"
REPO = Path(__file__).resolve().parents[2]
KUBE_DIR = REPO / "deploy" / "kubernetes"
CONFIG_MOUNT = "/etc/microvm/config.yaml"
KINDS = tuple(kind for kind in SECTIONS if kind != "supervisor")
NODE_KINDS = {"compute", "network", "relay", "snapshot"}
# Settings the manifests set that the schema gains in a change made alongside this one.
PENDING_SETTINGS = ("advertise_address", "node_labels")
# The fixed ports of a deployed installation (docs/deploy.md), gRPC and, for the gateway, HTTP.
FIXED_PORTS = {
    "gateway": {50051, 8080}, "auth": {50052}, "compute": {50053}, "relay": {50054}, "network": {50055},
    "snapshot": {50056},
}  # fmt: skip
# Values the downward API gives in a real pod.
FIELD_VALUES = {"spec.nodeName": "node-a", "status.podIP": "10.0.0.7", "metadata.name": "pod-0"}


def manifest_paths() -> list[Path]:
    return sorted(p for p in KUBE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def _parsed() -> tuple[tuple[str, dict], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple((p.name, doc) for p in manifest_paths() for doc in yaml.load_all(p.read_text(), loader) if doc)


def documents() -> list[tuple[str, dict]]:
    """(file name, document) for every manifest; copies, so a test may change them."""
    return copy.deepcopy(list(_parsed()))


def named(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads() -> list[dict]:
    return [d for _, d in documents() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def service_kind(container: dict) -> str | None:
    """`services.<kind>` from a container's `python -m services.<kind> ...` command."""
    command = container.get("command", [])
    if command[:2] == ["python", "-m"] and command[2].startswith("services."):
        return command[2].removeprefix("services.")
    return None


def service_containers() -> list[tuple[dict, dict, str]]:
    """(workload, container, kind) for every container that runs one of our services."""
    found = []
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if (kind := service_kind(container)) is not None:
                found.append((workload, container, kind))
    return found


@functools.cache
def config_text() -> str:
    return named("ConfigMap", "microvm-config")["data"]["config.yaml"]


def config() -> dict:
    return yaml.safe_load(config_text())


def config_file(tmp_path: Path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(config_text())
    return str(path)


def listen_ports(kind: str) -> set[int]:
    section = config()[kind]
    keys = ("listen", "http_listen") if kind == "gateway" else ("listen",)
    return {parse_address(section[key], key=key)[1] for key in keys}


def container_env(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: downward API values, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
    return env


def image_of_containerfile() -> str:
    text = (REPO / "deploy" / "Containerfile").read_text()
    repository = re.search(r'io\.github\.microvm-sandbox\.image="([^"]+)"', text)[1]
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text)[1]
    return f"{repository}:{version}"


def all_containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize(
    "doc", [d for _, d in documents()], ids=[f"{s}:{d['kind']}/{d['metadata']['name']}" for s, d in documents()]
)
def test_every_manifest_is_valid_for_the_pinned_kubernetes_in_strict_mode(doc):
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_strict_validation_rejects_a_misspelt_field():
    doc = named("Deployment", "microvm-gateway")
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_paths()]
    assert kustomization["namespace"] == "microvm"
    assert {d["metadata"].get("namespace", d["metadata"]["name"]) for _, d in documents()} == {"microvm"}


def test_each_container_mounts_its_own_kinds_certificate_from_a_generated_secret():
    generated = {g["name"]: g for g in yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())["secretGenerator"]}
    pki_dir = config()["pki_dir"]
    mounted = set()
    for workload, container, kind in service_containers():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == pki_dir]
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == f"microvm-pki-{kind}"
        assert {i["key"]: i["path"] for i in secret["items"]} == {
            "ca.crt": "ca.crt", "tls.crt": f"{kind}.crt", "tls.key": f"{kind}.key"
        }  # fmt: skip
        assert generated[secret["secretName"]]["type"] == "kubernetes.io/tls"
        assert sorted(generated[secret["secretName"]]["files"]) == sorted(
            ["ca.crt=pki/ca.crt", f"tls.crt=pki/{kind}.crt", f"tls.key=pki/{kind}.key"]
        )
        mounted.add(secret["secretName"])
    assert mounted == {f"microvm-pki-{kind}" for kind in KINDS}
    assert set(generated) == mounted | {"microvm-pki-etcd", "microvm-token-kek"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_renders_valid_manifests_once_the_pki_is_there(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBE_DIR, tree)
    ensure_pki(tree / "pki")
    rendered = subprocess.run(["kubectl", "kustomize", str(tree)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {f"microvm-pki-{kind}" for kind in (*KINDS, "etcd")} | {"microvm-token-kek"}
    assert all(s["metadata"]["namespace"] == "microvm" for s in secrets.values())


def test_every_container_of_ours_runs_the_image_the_containerfile_labels():
    image = image_of_containerfile()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image.endswith(":" + project["version"])
    ours = [c for w in workloads() if w["metadata"]["name"] != "etcd" for c in all_containers(w)]
    assert len(ours) >= 7
    assert {c["name"]: c["image"] for c in ours} == {c["name"]: image for c in ours}


def test_the_containerfile_builds_the_venv_and_protos_with_the_makefile_targets():
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("venv", "protos"):
        assert re.search(rf"^RUN .*make {target}\b", containerfile, re.M)
        assert re.search(rf"^{target}:", makefile, re.M)
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", containerfile, re.M)


def test_each_service_runs_once_with_the_config_map_mounted_where_it_reads_it():
    assert sorted(kind for _, _, kind in service_containers()) == sorted(KINDS)
    for workload, container, _kind in service_containers():
        assert container["command"][3:] == ["--config", CONFIG_MOUNT]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT]
        volume = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}[mount["name"]]
        assert volume["configMap"]["name"] == "microvm-config"
        assert mount["subPath"] == "config.yaml"


def test_the_config_map_loads_for_every_kind_listening_on_the_fixed_ports(tmp_path):
    path = config_file(tmp_path)
    for kind in KINDS:
        loaded = load_config(path, kind, SECTIONS[kind], environ={})
        assert loaded.common.etcd_endpoints == ["etcd-client.microvm.svc:2379"]
        assert loaded.service.listen.startswith("0.0.0.0:")
        assert listen_ports(kind) == FIXED_PORTS[kind], kind


def test_the_config_map_loads_with_each_containers_environment(tmp_path):
    path = config_file(tmp_path)
    for _, container, kind in service_containers():
        loaded = load_config(path, kind, SECTIONS[kind], environ=container_env(container))
        if kind in NODE_KINDS:
            assert loaded.common.node_id == FIELD_VALUES["spec.nodeName"]


def test_declared_ports_and_advertised_addresses_match_the_listen_ports():
    for _, container, kind in service_containers():
        assert {p["containerPort"] for p in container["ports"]} == listen_ports(kind), kind
        advertised = container_env(container)[f"MVM_{kind.upper()}_ADVERTISE_ADDRESS"]
        port = parse_address(config()[kind]["listen"], key="listen")[1]
        assert advertised == f"{FIELD_VALUES['status.podIP']}:{port}", kind


def test_every_probe_is_the_exec_probe_of_its_own_kind_with_the_config_map():
    expected = ["python", "-m", "services.common.probe", "--config", CONFIG_MOUNT]
    for _, container, kind in service_containers():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == [*expected, kind], (kind, probe)
            # The probe's own deadline is 2 s; Python needs time to start.
            assert container[probe]["timeoutSeconds"] > 2


def test_every_mvm_variable_names_a_setting():
    known = {f"MVM_{f.name.upper()}" for f in dataclasses.fields(CommonSettings)} | {"MVM_CACHE_DIR"}
    for section, cls in SECTIONS.items():
        known |= {f"MVM_{section.upper()}_{f.name.upper()}" for f in dataclasses.fields(cls)}
    used = {e["name"] for w in workloads() for c in all_containers(w) for e in c.get("env", [])}
    unknown = sorted(name for name in used if name.startswith("MVM_") and name not in known)
    pending = [name for name in unknown if name.lower().endswith(PENDING_SETTINGS)]
    assert unknown == pending, f"not settings: {sorted(set(unknown) - set(pending))}"
    if pending:
        pytest.skip(f"set by the manifests, not in the settings schema yet: {', '.join(pending)}")


def test_the_gateway_service_targets_the_gateway_ports():
    service = named("Service", "microvm-gateway")
    workload = named("Deployment", "microvm-gateway")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    targets = {by_name.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {p["port"] for p in service["spec"]["ports"]} == listen_ports("gateway")


def test_the_node_pod_is_privileged_on_the_host_network_with_kvm_and_the_host_state():
    node = named("DaemonSet", "microvm-node")["spec"]["template"]["spec"]
    assert node["hostNetwork"] is True
    assert node["dnsPolicy"] == "ClusterFirstWithHostNet"
    containers = {c["name"]: c for c in node["containers"]}
    assert set(containers) == NODE_KINDS
    assert containers["compute"]["securityContext"]["privileged"] is True
    assert containers["network"]["securityContext"]["privileged"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in node["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: host_paths.get(m["name"]) for m in containers["compute"]["volumeMounts"]}
    state_dir = config()["state_dir"]
    assert mounts["/dev/kvm"] == "/dev/kvm"
    assert mounts["/dev/net/tun"] == "/dev/net/tun"
    assert mounts[state_dir] == state_dir
    for kind in ("relay", "snapshot"):
        assert {m["mountPath"]: host_paths.get(m["name"]) for m in containers[kind]["volumeMounts"]}[state_dir]


def test_compute_limits_cover_what_the_node_hands_out():
    compute = config()["compute"]
    node = named("DaemonSet", "microvm-node")["spec"]["template"]["spec"]
    (container,) = [c for c in node["containers"] if c["name"] == "compute"]
    limits = container["resources"]["limits"]
    assert int(limits["cpu"]) >= compute["vcpus_total"]
    assert int(limits["memory"].removesuffix("Gi")) * 1024 > compute["memory_mib_total"]
    (shm,) = [v for v in node["volumes"] if v["name"] == "shm"]
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) * 1024 >= compute["memory_mib_total"]
    assert compute["ram_dir"].startswith("/dev/shm/")


def test_every_container_has_cpu_and_memory_requests_and_limits():
    for workload in workloads():
        for container in all_containers(workload):
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, (container["name"], bound)


def test_network_policies_open_the_configured_ports_and_deny_the_rest():
    settings = config()
    policies = {d["metadata"]["name"]: d["spec"] for _, d in documents() if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    (gateway_rule,) = policies["gateway"]["ingress"]
    assert "from" not in gateway_rule
    assert {p["port"] for p in gateway_rule["ports"]} == listen_ports("gateway")
    (auth_rule,) = policies["auth"]["ingress"]
    assert {p["port"] for p in auth_rule["ports"]} == listen_ports("auth")
    assert [s["podSelector"] for s in auth_rule["from"] if "podSelector" in s] == [
        {"matchLabels": {"app.kubernetes.io/component": "gateway"}}
    ]
    etcd_port = parse_address(settings["etcd_endpoints"][0], key="etcd_endpoints")[1]
    assert etcd_port in {p["port"] for rule in policies["etcd"]["ingress"] for p in rule["ports"]}
    node_cidrs = {s["ipBlock"]["cidr"] for name in ("etcd", "auth") for rule in policies[name]["ingress"]
                  for s in rule["from"] if "ipBlock" in s}  # fmt: skip
    assert len(node_cidrs) == 1, f"the node CIDR differs between policies: {node_cidrs}"


def generated_secrets() -> dict[str, dict]:
    return {g["name"]: g for g in yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())["secretGenerator"]}


def etcd_member() -> tuple[dict, dict]:
    """(pod spec, container) of the etcd StatefulSet."""
    spec = named("StatefulSet", "etcd")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def flag_values(command: list[str]) -> dict[str, str]:
    """--flag=value (or a bare --flag: "true") of a command line."""
    return {a.partition("=")[0]: a.partition("=")[2] or "true" for a in command if a.startswith("--")}


def mounted_etcd_pki(tmp_path: Path) -> tuple[Path, Path, str]:
    """The PKI made as pki/README.md says, and the directory the etcd member sees it in: each file the way the
    kustomization puts it in the Secret and the StatefulSet's volume maps the Secret's keys to file names.
    Returns (pki, the mount's stand-in, the mount path in the pod)."""
    pki = tmp_path / "pki"
    ensure_pki(pki)
    spec, container = etcd_member()
    sources = dict(f.split("=", 1) for f in generated_secrets()["microvm-pki-etcd"]["files"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if volumes.get(m["name"], {}).get("secret")]
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "microvm-pki-etcd"
    seen = tmp_path / "mounted"
    seen.mkdir()
    for item in secret["items"]:
        (seen / item["path"]).write_bytes((pki / Path(sources[item["key"]]).name).read_bytes())
    return pki, seen, mount["mountPath"]


def test_etcd_serves_clients_only_over_tls_to_certificates_of_the_installations_ca():
    spec, container = etcd_member()
    flags = flag_values(container["command"])
    assert flags["--client-cert-auth"] == "true"
    assert flags["--listen-client-urls"].startswith("https://")
    assert flags["--advertise-client-urls"].startswith("https://")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "pki"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "pki"]
    paths = {i["key"]: f"{mount['mountPath']}/{i['path']}" for i in volume["secret"]["items"]}
    assert (flags["--trusted-ca-file"], flags["--cert-file"], flags["--key-file"]) == (
        paths["ca.crt"], paths["tls.crt"], paths["tls.key"]
    )  # fmt: skip
    assert sorted(generated_secrets()["microvm-pki-etcd"]["files"]) == sorted(
        ["ca.crt=pki/ca.crt", "tls.crt=pki/etcd.crt", "tls.key=pki/etcd.key"]
    )
    # The client port answers only TLS with a client certificate: no kubelet HTTP(S) probe can pass.
    assert all(
        "httpGet" not in container.get(probe, {}) for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    # Services verify etcd as they verify each other, with the CA their own Secret holds.
    assert config()["etcd_tls"] is True


def test_only_the_auth_deployment_mounts_the_token_key_encryption_key_and_auth_reads_a_private_copy():
    mounting = []
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if volume.get("secret", {}).get("secretName") == "microvm-token-kek":
                mounting.append((workload["metadata"]["name"], spec, volume))
    ((name, spec, secret_volume),) = mounting
    assert name == "microvm-auth"
    (init,) = spec["initContainers"]
    (auth,) = spec["containers"]
    assert secret_volume["name"] in {m["name"] for m in init["volumeMounts"]}
    assert secret_volume["name"] not in {m["name"] for m in auth["volumeMounts"]}
    # A secret volume is group-readable under fsGroup, which auth refuses (TOKEN_KEK_EXPOSED): the init container
    # copies the key, 0600, into memory, where auth reads it through auth.token_kek_file.
    assert init["command"][:3] == ["install", "-m", "0600"]
    copy = Path(init["command"][-1])
    (memory,) = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == memory["name"]]
    (auth_mount,) = [m for m in auth["volumeMounts"] if m["name"] == memory["name"]]
    assert copy.parent == Path(init_mount["mountPath"]) == Path(auth_mount["mountPath"])
    assert auth_mount["readOnly"] is True
    assert container_env(auth)["MVM_AUTH_TOKEN_KEK_FILE"] == str(copy)
    assert generated_secrets()["microvm-token-kek"]["files"] == ["token-kek.key=pki/token-kek.key"]


@pytest.mark.timeout(60)
async def test_the_etcd_members_flags_admit_only_certificates_of_the_ca_and_the_readiness_probe_passes(tmp_path):
    """The StatefulSet's own client and TLS flags (cluster flags aside), run by a real etcd on free loopback ports
    with the PKI mounted as the pod sees it: the operator's certificate gets in, clients without one do not, and the
    readiness probe's etcdctl command (when etcdctl is installed) says healthy."""
    pki, mounted, mount_path = mounted_etcd_pki(tmp_path)
    _, container = etcd_member()
    tls = [
        a.replace(mount_path, str(mounted))
        for a in container["command"]
        if a.partition("=")[0] in ("--cert-file", "--key-file", "--trusted-ca-file", "--client-cert-auth")
    ]
    scheme = flag_values(container["command"])["--listen-client-urls"].partition("://")[0]
    port, peer = free_port(), free_port()
    process = subprocess.Popen(
        [
            shutil.which("etcd") or "etcd", "--name", "m", "--data-dir", str(tmp_path / "data"), *tls,
            "--listen-client-urls", f"{scheme}://127.0.0.1:{port}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"m=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "etcd.log", "wb"),
    )  # fmt: skip
    try:
        endpoint = f"127.0.0.1:{port}"
        assert await writes_and_reads(etcd_client([endpoint], timeout=3, identity=load_identity(pki, "operator")))
        # TLS without a client certificate is refused as well as a plain client.
        anonymous = dataclasses.replace(load_identity(pki, "operator"), key=None, certificate=None)
        assert not await writes_and_reads(etcd_client([endpoint], timeout=3, identity=anonymous), attempts=1)
        assert not await writes_and_reads(etcd_client([endpoint], timeout=3), attempts=1)
        if shutil.which("etcdctl"):
            probe = [
                a.replace(mount_path, str(mounted)).replace("127.0.0.1:2379", endpoint)
                for a in container["readinessProbe"]["exec"]["command"]
            ]
            probe[0] = shutil.which("etcdctl")
            result = subprocess.run(probe, capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, result.stdout + result.stderr
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
                await client.put(b"/microvm/manifest-probe", b"x")
                return (await client.get(b"/microvm/manifest-probe")).value == b"x"
            except aetcd.exceptions.ConnectionFailedError:
                await client.close()
                await asyncio.sleep(0.1)
        return False
    finally:
        await client.close()
