"""A real etcd for tests that need one without a whole stack: its own data dir and free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, and never one this process handed out before: a config that takes several (a stack's etcd,
    gateway, HTTP door...) binds them only later, so the kernel may offer the same free port twice meanwhile."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class LocalEtcd:
    def __init__(self, directory: Path, pki: Path | None = None) -> None:
        """With `pki` (services.common.pki.ensure_pki), etcd serves TLS and admits only clients with a certificate
        of that CA, as the supervisor runs it."""
        self.directory = directory
        self.client_port, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        scheme = "https" if pki else "http"
        tls = (
            [
                f"--cert-file={pki / 'etcd.crt'}",
                f"--key-file={pki / 'etcd.key'}",
                f"--trusted-ca-file={pki / 'ca.crt'}",
                "--client-cert-auth",
            ]
            if pki
            else []
        )
        self.process = subprocess.Popen(
            [
                shutil.which("etcd") or "etcd",
                "--name",
                "test",
                "--data-dir",
                str(directory / "etcd"),
                *tls,
                "--listen-client-urls",
                f"{scheme}://{self.endpoint}",
                "--advertise-client-urls",
                f"{scheme}://{self.endpoint}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"test=http://127.0.0.1:{peer}",
                "--log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(directory / "etcd.log", "ab"),
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"etcd did not start: {(directory / 'etcd.log').read_text()[-1000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class CountingEtcd:
    """The etcd client, counting the requests made through it."""

    def __init__(self, etcd) -> None:
        self.etcd, self.requests = etcd, []

    def __getattr__(self, name):
        attribute = getattr(self.etcd, name)
        if name not in ("get", "get_prefix", "put", "transaction"):
            return attribute

        async def counted(*args, **kwargs):
            self.requests.append(name)
            return await attribute(*args, **kwargs)

        return counted
