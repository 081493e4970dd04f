"""The supervisor's work: etcd and the six services as child processes, restarted when they crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import LoadedConfig, load_config
from services.common.pki import Identity, ensure_pki
from services.common.records import ATTACHMENTS, Records
from services.common.registry import SERVICES_PREFIX, ServiceInstance, etcd_client, etcd_identity
from services.common.settings import ComputeSettings, SupervisorSettings
from services.network.links import delete_tap
from services.supervisor import prometheus
from services.supervisor.bootstrap import bootstrap_admin_key, operator_channel
from services.supervisor.children import child_spawn

SERVICE_KINDS = ("auth", "snapshot", "network", "relay", "compute", "gateway")
# What each role runs: `node` on every host with VMs, `control` (any number of replicas) anywhere, `all` on one
# host (with its own etcd).
ROLES = {
    "all": SERVICE_KINDS,
    "node": ("snapshot", "network", "relay", "compute"),
    "control": ("auth", "gateway"),
}
# A child that stayed up this long is healthy again: its next crash restarts without back-off.
STABLE_SECONDS = 10.0


@dataclass
class Child:
    name: str
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0


class StackSupervisor:
    def __init__(
        self,
        state_dir: Path,
        config: LoadedConfig[SupervisorSettings],
        config_path: str | None,
        role: str = "all",
        run_etcd: bool | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.config = config
        self.settings = config.service
        self.config_path = config_path
        self.logs = state_dir / "logs"
        self.children: dict[str, Child] = {}
        self._stopping = asyncio.Event()
        self.kinds = ROLES[role]
        # etcd comes with the one-host layout; hosts of a cluster use the etcd named by `etcd_endpoints`.
        self.run_etcd = role == "all" if run_etcd is None else run_etcd

    @property
    def etcd_identity(self) -> Identity | None:
        """The supervisor talks to etcd as the operator."""
        return etcd_identity(self.config.common, "operator")

    @property
    def etcd_endpoints(self) -> list[str]:
        if self.run_etcd:
            return [f"127.0.0.1:{self.settings.etcd_client_port}"]
        return self.config.common.etcd_endpoints

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MVM_STATE_DIR"] = str(self.state_dir)
        if self.run_etcd:
            env["MVM_ETCD_ENDPOINTS"] = f"127.0.0.1:{self.settings.etcd_client_port}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _etcd_command(self) -> list[str]:
        port, host = self.settings.etcd_client_port, self.settings.etcd_listen_host
        tls = self.config.common.etcd_tls
        scheme = "https" if tls else "http"
        client = f"{scheme}://127.0.0.1:{port}"
        # Always on loopback (this host's services); also on `etcd_listen_host` for the other hosts' services.
        listen = (
            client
            if host in ("127.0.0.1", "localhost")
            else f"{scheme}://{host}:{port}"
            if host in ("0.0.0.0", "::")
            else f"{client},{scheme}://{host}:{port}"
        )
        advertise = client if host in ("127.0.0.1", "localhost", "0.0.0.0", "::") else f"{scheme}://{host}:{port}"
        # The one member's peer port stays on loopback: no peer ever connects from elsewhere.
        peer = f"http://127.0.0.1:{self.settings.etcd_peer_port}"
        pki = self.config.common.pki_path
        # Only clients with a certificate of the installation's CA get in.
        certificates = (
            [
                f"--cert-file={pki / 'etcd.crt'}",
                f"--key-file={pki / 'etcd.key'}",
                f"--trusted-ca-file={pki / 'ca.crt'}",
                "--client-cert-auth",
            ]
            if tls
            else []
        )
        return [
            self.settings.etcd_binary,
            *certificates,
            "--name",
            "microvm",
            "--data-dir",
            str(self.state_dir / "etcd"),
            "--listen-client-urls",
            listen,
            "--advertise-client-urls",
            advertise,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"microvm={peer}",
            # Old revisions go after an hour, as in deploy/: without it etcd's database grows with every write
            # until its backend quota is hit and it refuses all writes (the soak suite showed +6.6 MiB/min).
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
            "--log-level",
            "warn",
        ]

    def _service_command(self, kind: str) -> list[str]:
        command = [sys.executable, "-m", f"services.{kind}"]
        if self.config_path:
            command += ["--config", str(Path(self.config_path).resolve())]
        return command

    async def _spawn(self, child: Child) -> None:
        log = open(child.log_path, "ab")
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {' '.join(child.command)}\n".encode())
        log.flush()
        argv, preexec = child_spawn(child.command)
        child.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=self._env(), preexec_fn=preexec
        )
        log.close()
        child.started_at = time.monotonic()
        self._write_status()

    def _write_status(self) -> None:
        status = {
            name: {"pid": c.process.pid if c.process else None, "restarts": c.restarts}
            for name, c in self.children.items()
        }
        (self.state_dir / "supervisor.json").write_text(json.dumps(status, indent=1))

    async def _wait_for_etcd(self, timeout: float = 30.0) -> None:
        client = etcd_client(self.etcd_endpoints, timeout=2, identity=self.etcd_identity)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await client.connect()
                await client.get(b"/microvm/ping")
                await client.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    where = self.logs / "etcd.log" if self.run_etcd else ", ".join(self.etcd_endpoints)
                    raise RuntimeError(f"etcd did not answer in {timeout}s; see {where}") from None
                etcd = self.children["etcd"].process if "etcd" in self.children else None
                if etcd and etcd.returncode is not None:
                    raise RuntimeError(f"etcd exited with {etcd.returncode}; see {self.logs / 'etcd.log'}") from None
                await asyncio.sleep(0.1)

    async def _watch(self, child: Child) -> None:
        """Restarts `child` whenever it exits, with exponential back-off for quick crashes."""
        while not self._stopping.is_set():
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - child.started_at
            if uptime >= STABLE_SECONDS:
                child.backoff = 0.0
            delay = child.backoff
            child.backoff = min(
                max(child.backoff * 2, self.settings.restart_backoff_initial_seconds),
                self.settings.restart_backoff_max_seconds,
            )
            print(
                json.dumps(
                    {
                        "event": "child_exited",
                        "child": child.name,
                        "code": code,
                        "uptime": round(uptime, 2),
                        "restart_in": delay,
                    }
                ),
                flush=True,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay) if delay else None
            except TimeoutError:
                pass
            if self._stopping.is_set():
                return
            child.restarts += 1
            await self._spawn(child)

    async def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if self.config.common.internal_tls or self.config.common.etcd_tls:
            ensure_pki(self.config.common.pki_path)
        (self.state_dir / "supervisor.pid").write_text(str(os.getpid()))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        watchers = []
        try:
            if self.run_etcd:
                etcd = Child("etcd", self._etcd_command(), self.logs / "etcd.log")
                self.children["etcd"] = etcd
                await self._spawn(etcd)
            await self._wait_for_etcd()
            if self.run_etcd:
                watchers.append(asyncio.create_task(self._watch(etcd)))
            for kind in self.kinds:
                child = Child(kind, self._service_command(kind), self.logs / f"{kind}.log")
                self.children[kind] = child
                await self._spawn(child)
                watchers.append(asyncio.create_task(self._watch(child)))
            watchers.extend(await self._start_prometheus())
            print(json.dumps({"event": "stack_started", "children": list(self.children)}), flush=True)
            if "auth" in self.kinds:
                watchers.append(asyncio.create_task(self._bootstrap_admin_key()))
            await self._stopping.wait()
        except Exception as exc:
            print(json.dumps({"event": "stack_failed", "error": str(exc)}), flush=True)
            return_code = 1
        else:
            return_code = 0
        finally:
            self._stopping.set()
            for task in watchers:
                task.cancel()
            await self._shutdown()
            (self.state_dir / "supervisor.pid").unlink(missing_ok=True)
        return return_code

    async def _start_prometheus(self) -> list[asyncio.Task]:
        """Prometheus with the registry's targets (services/supervisor/prometheus.py), in the one-host layout."""
        if not (self.run_etcd and self.settings.prometheus_listen):
            return []
        prepared = await prometheus.prepare(self.settings, self.state_dir, self.etcd_endpoints, self.etcd_identity)
        if prepared is None:
            print(json.dumps({"event": "prometheus_missing", "binary": self.settings.prometheus_binary}), flush=True)
            return []
        command, keep_targets = prepared
        child = Child("prometheus", command, self.logs / "prometheus.log")
        self.children["prometheus"] = child
        await self._spawn(child)
        return [asyncio.create_task(self._watch(child)), asyncio.create_task(keep_targets(self._stopping))]

    async def _bootstrap_admin_key(self) -> None:
        """On the first start: a `default` tenant and an admin API key, written to <state>/admin.key (0600)."""
        pki = self.config.common.pki_path if self.config.common.internal_tls else None
        await bootstrap_admin_key(
            self.etcd_endpoints, pki, self.state_dir / "admin.key", self._stopping, etcd_identity=self.etcd_identity
        )

    async def _stop_child(self, child: Child, grace: float) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=grace)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _shutdown(self) -> None:
        services = [c for name, c in self.children.items() if name != "etcd"]
        # Gateway first so no new work arrives, then the rest together.
        gateway = self.children.get("gateway")
        if gateway:
            await self._stop_child(gateway, 15)
        await asyncio.gather(*(self._stop_child(c, 15) for c in services if c is not gateway))
        if "compute" in self.kinds:
            stop_leftover_vms(self.state_dir, load_config(self.config_path, "compute", ComputeSettings).service)
        if self.config.common.networking and "network" in self.kinds:
            await self._remove_sandbox_taps()
        if "etcd" in self.children:
            await self._stop_child(self.children["etcd"], 10)
        self._write_status()
        print(json.dumps({"event": "stack_stopped"}), flush=True)

    async def _remove_sandbox_taps(self) -> None:
        """The VMs are gone: so go their TAP devices. Their records stay, and the next start reconciles them
        (compute fails the VMs, the network service releases their addresses)."""
        client = etcd_client(self.etcd_endpoints, timeout=2, identity=self.etcd_identity)
        try:
            await client.connect()
            attachments = await Records(client).list(ATTACHMENTS, self.config.common.node)
            taps = [stored.message.tap_device for stored in attachments]
        except Exception as exc:  # stopping must not fail on this; the next start cleans up
            print(json.dumps({"event": "tap_cleanup_skipped", "error": str(exc)}), flush=True)
            return
        finally:
            await client.close()
        for tap in filter(None, taps):
            await delete_tap(tap)


def stop_leftover_vms(state_dir: Path, compute: ComputeSettings | None = None) -> int:
    """Kills VMM processes that compute left running (VMs outlive a compute restart by design) and frees
    their RAM files."""
    killed = 0
    for pid_file in (state_dir / "compute" / "vms").glob("*/vmm.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pid_file.parent).encode() in cmdline:  # the pid still belongs to this VM
            os.kill(pid, signal.SIGKILL)
            killed += 1
    ram_root = (compute or ComputeSettings()).ram_root(state_dir)
    for ram in ram_root.glob("*.ram") if ram_root.exists() else []:
        ram.unlink(missing_ok=True)
    try:
        ram_root.rmdir()
    except OSError:
        pass
    return killed


async def check_stack_health(
    etcd_endpoints: list[str],
    detailed: bool = False,
    pki_dir: Path | None = None,
    node: str | None = None,
    etcd_identity: Identity | None = None,
) -> dict[str, str]:
    """Health of each registered service kind (its newest instance; node services of `node` only, when given),
    read from the registry and the health service."""
    report: dict[str, str] = {}
    client = etcd_client(etcd_endpoints, timeout=2, identity=etcd_identity)
    try:
        await client.connect()
        result = await client.get_prefix(SERVICES_PREFIX.encode())
        instances = [ServiceInstance.decode(kv.key, kv.value) for kv in result]
    except Exception as exc:
        return {"etcd": f"UNREACHABLE ({exc.__class__.__name__})"}
    finally:
        try:
            await client.close()
        except Exception:
            pass
    if node is not None:
        instances = [i for i in instances if not i.node or i.node == node]
    for instance in sorted(instances, key=lambda i: i.started):
        async with operator_channel(instance.address, instance.kind, pki_dir) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                state = f"UNREACHABLE ({exc.code().name})"
        extra = ""
        if detailed:
            extra = f" at {instance.address} (pid {instance.pid})"
            if instance.node:
                extra += f" node={instance.node}"
            if instance.metadata:
                extra += " " + " ".join(f"{k}={v}" for k, v in sorted(instance.metadata.items()))
        report[instance.kind] = state + extra
    return report
