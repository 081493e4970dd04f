"""Network namespaces made by the tests: a node with the whole stack in it, and an "internet" beside it.

    root namespace (untouched; tests reach the node only by running code inside it)
    node      198.51.100.1/24 --veth-- 198.51.100.2/24, .3/24  internet
              the stack (etcd, gateway, ...), bridge, TAPs       HTTP servers on .2:8000, .2:8001, .3:8000
                                                                 and a "metadata service" on 169.254.169.254:80

No test traffic goes anywhere else. `run_in(namespace, function, *args)` runs a module-level function of
this repository inside a namespace (a fresh interpreter under `ip netns exec`) and returns its result or
re-raises its exception, so assertions can live in either place.
"""

from __future__ import annotations

import base64
import importlib
import pickle
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODE_UPLINK = "198.51.100.1"
INTERNET = "198.51.100.2"
INTERNET_OTHER = "198.51.100.3"
METADATA = "169.254.169.254"  # where clouds serve instance metadata (and credentials)
HTTP_ENDPOINTS = ((INTERNET, 8000), (INTERNET, 8001), (INTERNET_OTHER, 8000))

HTTP_SERVER = """
import http.server, socketserver, sys, threading
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"internet {self.server.server_address[0]}:{self.server.server_address[1]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
servers = []
for endpoint in sys.argv[1:]:
    host, port = endpoint.rsplit(":", 1)
    server = socketserver.ThreadingTCPServer((host, int(port)), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
print("ready", flush=True)
threading.Event().wait()
"""


def sh(*argv: str, namespace: str | None = None, check: bool = True) -> str:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def run_in(namespace: str, function, *args, timeout: float = 600):
    """`function(*args)` executed inside `namespace`; its exception is raised here."""
    module = function.__module__
    if module == "__main__":  # run as `python -m package.module`: import it under its real name
        module = sys.modules["__main__"].__spec__.name
    payload = base64.b64encode(pickle.dumps((module, function.__qualname__, args)))
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", "from tests.netns import _child; _child()"],
        input=payload,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{function.__qualname__} in {namespace} exited {result.returncode}: {result.stderr.decode()[-3000:]}"
        )
    ok, value = pickle.loads(base64.b64decode(lines[-1]))
    if not ok:
        raise value
    return value


class RemoteRpcError(Exception):
    """A grpc.RpcError raised inside a namespace (those do not pickle): same code() and details()."""

    def __init__(self, code_name: str, details: str) -> None:
        super().__init__(code_name, details)
        self.code_name, self._details = code_name, details

    def __str__(self) -> str:
        return f"{self.code_name}: {self._details}"

    def code(self):
        import grpc

        return grpc.StatusCode[self.code_name]

    def details(self) -> str:
        return self._details


def _child() -> None:
    module, qualname, args = pickle.loads(base64.b64decode(sys.stdin.buffer.read()))
    function = importlib.import_module(module)
    for part in qualname.split("."):
        function = getattr(function, part)
    try:
        outcome = (True, function(*args))
    except BaseException as exc:  # handed to the parent, which raises it
        if hasattr(exc, "code") and hasattr(exc, "details"):
            exc = RemoteRpcError(exc.code().name, exc.details())
        outcome = (False, exc)
    sys.stdout.flush()
    print("\n" + base64.b64encode(pickle.dumps(outcome)).decode(), flush=True)


@dataclass
class NetnsLab:
    node: str = ""
    internet: str = ""
    servers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls) -> NetnsLab:
        tag = secrets.token_hex(3)
        lab = cls(node=f"mvmtest-{tag}-node", internet=f"mvmtest-{tag}-inet")
        try:
            lab._build(tag)
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _build(self, tag: str) -> None:
        node_end, internet_end = f"mvn{tag}", f"mvi{tag}"
        sh("ip", "netns", "add", self.node)
        sh("ip", "netns", "add", self.internet)
        sh(
            "ip",
            "link",
            "add",
            node_end,
            "netns",
            self.node,
            "type",
            "veth",
            "peer",
            "name",
            internet_end,
            "netns",
            self.internet,
        )
        for namespace, device, addresses in (
            (self.node, node_end, [f"{NODE_UPLINK}/24"]),
            (self.internet, internet_end, [f"{INTERNET}/24", f"{INTERNET_OTHER}/24", f"{METADATA}/32"]),
        ):
            sh("ip", "link", "set", "lo", "up", namespace=namespace)
            for address in addresses:
                sh("ip", "addr", "add", address, "dev", device, namespace=namespace)
            sh("ip", "link", "set", device, "up", namespace=namespace)
        sh("ip", "route", "add", "default", "via", INTERNET, namespace=self.node)
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.internet,
                sys.executable,
                "-c",
                HTTP_SERVER,
                *(f"{h}:{p}" for h, p in HTTP_ENDPOINTS),
                f"{METADATA}:80",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.servers.append(server)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"internet HTTP servers did not start: {server.stderr.read()}")

    def destroy(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait(10)
        for namespace in (self.node, self.internet):
            if namespace:
                # Anything still running inside would keep the namespace's devices alive.
                for pid in sh("ip", "netns", "pids", namespace, check=False).split():
                    subprocess.run(["kill", "-9", pid], capture_output=True)
                time.sleep(0.1)
                sh("ip", "netns", "del", namespace, check=False)
