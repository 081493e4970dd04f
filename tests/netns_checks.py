"""What the network tests do inside the node namespace (see tests/netns.py): API calls and probes.

Functions here run in a fresh interpreter inside the namespace, so they take plain arguments and return
plain values (or protobuf messages, which pickle).
"""

from __future__ import annotations

import json
import socket
import urllib.request

from google.protobuf import field_mask_pb2

from microvm.network.v1 import network_pb2, network_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.guests import Gateway

# Runs in the guest: connects to each host:port (in parallel) and reports `open <first bytes of the
# answer>` or `blocked <why>`.
PROBE = r"""
import concurrent.futures, json, socket, sys
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            # To the end of the response (HTTP/1.0: the server closes): one recv may hold the headers alone.
            received = b""
            try:
                while len(received) < 65536 and (chunk := s.recv(4096)):
                    received += chunk
            except OSError:
                pass
            data = received.decode(errors="replace")
            return "open " + data.split("\r\n\r\n", 1)[-1][:60]
    except Exception as exc:
        return "blocked " + type(exc).__name__
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    print(json.dumps(dict(zip(sys.argv[1:], pool.map(probe, sys.argv[1:])))))
"""


def create(
    address: str, key: str, egress: int, allow: list[tuple[str, list[int]]] = (), labels: dict | None = None
) -> sandbox_pb2.Sandbox:
    policy = sandbox_pb2.NetworkPolicy(egress=egress)
    for cidr, ports in allow:
        policy.allow.add(cidr=cidr, ports=ports)
    return Gateway(address, key).create(network_policy=policy, labels=labels or {})


def get(address: str, key: str, name: str) -> sandbox_pb2.Sandbox:
    return Gateway(address, key).stub.GetSandbox(api.GetSandboxRequest(name=name), timeout=30).sandbox


def delete(address: str, key: str, name: str) -> None:
    Gateway(address, key).delete(name)


def update_policy(
    address: str, key: str, name: str, egress: int, allow: list[tuple[str, list[int]]] = ()
) -> sandbox_pb2.Sandbox:
    policy = sandbox_pb2.NetworkPolicy(egress=egress)
    for cidr, ports in allow:
        policy.allow.add(cidr=cidr, ports=ports)
    return (
        Gateway(address, key)
        .stub.UpdateSandbox(
            api.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=name, network_policy=policy),
                update_mask=field_mask_pb2.FieldMask(paths=["network_policy"]),
            ),
            timeout=30,
        )
        .sandbox
    )


def expose(address: str, key: str, name: str, guest_port: int) -> sandbox_pb2.ExposedPort:
    return (
        Gateway(address, key)
        .stub.ExposePort(api.ExposePortRequest(sandbox=name, guest_port=guest_port), timeout=30)
        .port
    )


def fork(address: str, key: str, name: str) -> list[sandbox_pb2.Sandbox]:
    return list(Gateway(address, key).stub.ForkSandbox(api.ForkSandboxRequest(name=name), timeout=300).sandboxes)


def run(address: str, key: str, name: str, argv: list[str]) -> tuple[int, str, str]:
    result = Gateway(address, key).exec(name, argv, timeout=120)
    return result.exit_code, result.stdout.decode(), result.stderr.decode()


def probe_from_guest(address: str, key: str, name: str, targets: list[str]) -> dict[str, str]:
    code, out, err = run(address, key, name, ["python3", "-c", PROBE, *targets])
    if code != 0:
        raise AssertionError(f"probe failed in {name}: {err}")
    return json.loads(out)


def serve_in_guest(address: str, key: str, name: str, port: int) -> None:
    """A small HTTP server in the guest answering `guest <hostname>`, running in the background."""
    server = (
        f"import http.server, socket\n"
        f"class H(http.server.BaseHTTPRequestHandler):\n"
        f"    def do_GET(self):\n"
        f"        body = ('guest ' + socket.gethostname()).encode()\n"
        f"        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        f"        self.end_headers(); self.wfile.write(body)\n"
        f"http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    )
    code, _, err = run(
        address,
        key,
        name,
        [
            "sh",
            "-c",
            f"cat > /tmp/serve.py <<'EOF'\n{server}EOF\n"
            f"nohup python3 /tmp/serve.py >/dev/null 2>&1 &\n"
            f'for i in $(seq 50); do python3 -c "import socket; '
            f"socket.create_connection(('127.0.0.1', {port}), 1)\" 2>/dev/null "
            f"&& exit 0; sleep 0.1; done; exit 1",
        ],
    )
    if code != 0:
        raise AssertionError(f"guest server did not start: {err}")


def probe_from_host(targets: list[str]) -> dict[str, str]:
    """Connects from the node itself (its root of the namespace, not a sandbox)."""
    results = {}
    for target in targets:
        host, port = target.rsplit(":", 1)
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as response:
                results[target] = "open " + response.read().decode()[:60]
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            results[target] = "open (HTTP error)" if hasattr(exc, "code") else f"blocked {type(reason).__name__}"
    return results


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def tcp_open_all(targets: list[str]) -> dict[str, bool]:
    return {t: tcp_open(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in targets}


def attachments(stack) -> list[network_pb2.Attachment]:
    network = next(i for i in stack.registered() if i.kind == "network")
    stub = network_pb2_grpc.NetworkServiceStub(stack.internal_channel(network.address))
    return list(stub.ListAttachments(network_pb2.ListAttachmentsRequest(), timeout=10).attachments)


def host_network_state(stack) -> dict:
    """Everything of ours in the namespace: TAP devices, nftables chains, address records in etcd."""
    import subprocess

    links = json.loads(subprocess.run(["ip", "-json", "link", "show"], capture_output=True, text=True).stdout)
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    return {
        "taps": sorted(link["ifname"] for link in links if link["ifname"].startswith("mvt")),
        "bridge_mac": next((link["address"] for link in links if link["ifname"] == "mvmbr0"), ""),
        "ruleset": ruleset,
        "attachments": [a.sandbox_id for a in attachments(stack)],
    }


def network_service_pid(stack) -> int:
    return next(i.pid for i in stack.registered() if i.kind == "network")


def http_json(base: str, key: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One call of the gateway's HTTP/JSON API."""
    import urllib.error

    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def tamper() -> None:
    """What an operator or another tool might do behind the network service's back."""
    import subprocess

    subprocess.run(["nft", "delete", "table", "inet", "microvm"], check=True)
    subprocess.run(["ip", "tuntap", "add", "dev", "mvtstray000000", "mode", "tap"], check=True)
