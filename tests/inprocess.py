"""Services run in the test's own event loop by the real bootstrap (`serve`): real gRPC servers on loopback
port 0, real etcd, registrations and node locks, wiring as in production, in a fraction of a second."""

from __future__ import annotations

import asyncio
import importlib
import json
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.config import CommonSettings
from services.common.pki import create_kek
from services.common.records import SERVICES, Records
from services.common.registry import etcd_client
from services.common.server import serve
from services.common.settings import SECTIONS
from services.supervisor.stack import stop_leftover_vms

_clients: dict[str, object] = {}


def etcd_client_for(endpoint: str):
    """One connected client per endpoint for the test process (aetcd connects lazily on first use)."""
    if endpoint not in _clients:
        _clients[endpoint] = etcd_client([endpoint])
    return _clients[endpoint]


def fake_image_root(directory: Path, templates=("default",)) -> Path:
    """An image cache holding builds of `templates` for the fake VMM (it needs only their manifests)."""
    for template in templates:
        build = directory / template / "fakebuild0001"
        build.mkdir(parents=True, exist_ok=True)
        # 1 GiB root filesystems, as the real recipes build: what a sandbox's disk counts against its tenant.
        (build / "manifest.json").write_text(json.dumps({"template": template, "rootfs_size_mib": 1024}))
        (build / ".complete").touch()
        (directory / template / "current").write_text(build.name)
    return directory


@dataclass
class Running:
    kind: str
    task: asyncio.Task
    stop: asyncio.Event
    ready: asyncio.Event


@dataclass
class InProcessNode:
    """One node's services (and, when asked, the cluster services) in this event loop."""

    etcd_endpoint: str
    state_dir: Path
    node: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    running: dict[str, Running] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    http: str = ""  # the gateway's HTTP/JSON base URL, once `start_installation` started it

    def common(self) -> CommonSettings:
        return CommonSettings(
            state_dir=str(self.state_dir),
            etcd_endpoints=[self.etcd_endpoint],
            lease_ttl_seconds=2,
            internal_tls=False,
            etcd_tls=False,
            node_id=self.node,
            networking=False,
        )

    async def start(self, kind: str, key: str = "", **settings) -> None:
        # Nothing to drain in a test: a stop takes no longer than its steps.
        values = {"shutdown_grace_seconds": 0.2, **self.settings.get(kind, {}), **settings}
        if kind == "gateway":  # the E2B doors on free ports, never the fixed defaults other sessions may hold
            values = {"e2b_api_listen": "127.0.0.1:0", "e2b_sandbox_listen": "127.0.0.1:0", **values}
        if kind == "auth" and not values.get("token_kek_file"):
            # Installations of one test session share an etcd, so their auths share the key that seals the
            # signing keys there, as the auth replicas of one installation do.
            values["token_kek_file"] = str(shared_token_kek(self.etcd_endpoint))
        self.settings[kind] = values
        service_settings = SECTIONS[kind](**values)
        server = importlib.import_module(f"services.{kind}.server")
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            serve(
                kind,
                self.common(),
                service_settings,
                server.wire,
                instance_id=f"{kind}-{self.node}-{uuid.uuid4().hex[:4]}",
                ready=ready,
                stop=stop,
                interceptors=getattr(server, "interceptors", None),
            )
        )
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED, timeout=30)
        waiter.cancel()
        if task.done():
            task.result()  # raises what stopped it
        if not ready.is_set():
            raise TimeoutError(f"{kind} did not start")
        self.running[key or kind] = Running(kind, task, stop, ready)

    async def start_duplicate(self, kind: str) -> None:
        """Another instance of `kind` for this node (it is expected to refuse)."""
        await self.start(kind, key=f"{kind}-duplicate")

    async def stop(self, kind: str) -> None:
        running = self.running.pop(kind)
        running.stop.set()
        await asyncio.wait_for(running.task, 30)

    async def address(self, kind: str) -> str:
        """Where this node's (or, for cluster services, any) instance of `kind` serves, from the registry."""
        client = etcd_client_for(self.etcd_endpoint)
        await client.connect()
        for stored in await Records(client).list(SERVICES, kind):
            if stored.message.node in (self.node, ""):
                return stored.message.address
        raise LookupError(f"no {kind} registered")

    async def registration_metadata(self, kind: str, key: str) -> str:
        """A value this node's (or any) instance of `kind` published with its registration, e.g. the gateway's
        bound E2B addresses (`e2b_api`, `e2b_sandbox`)."""
        client = etcd_client_for(self.etcd_endpoint)
        await client.connect()
        for stored in await Records(client).list(SERVICES, kind):
            if stored.message.node in (self.node, "") and key in stored.message.metadata:
                return stored.message.metadata[key]
        raise LookupError(f"no {kind} registered with {key}")

    async def metrics_address(self, kind: str) -> str:
        """Where this node's (or any) instance of `kind` serves /metrics, from its registration."""
        client = etcd_client_for(self.etcd_endpoint)
        await client.connect()
        for stored in await Records(client).list(SERVICES, kind):
            if stored.message.node in (self.node, ""):
                return stored.message.metadata["metrics"]
        raise LookupError(f"no {kind} registered")

    def channel(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    async def stop_all(self) -> None:
        """Stops the services, then the VMs they leave running (as `make down` does: VMs outlive compute)."""
        for kind in list(self.running)[::-1]:
            await self.stop(kind)
        stop_leftover_vms(self.state_dir)


def shared_token_kek(etcd_endpoint: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"mvm-test-token-kek-{etcd_endpoint.replace(':', '-')}.key"
    create_kek(path)
    return path


class Caller:
    """The public API as a tenant sees it: SandboxService over gRPC with the tenant's API key."""

    def __init__(self, address: str, key: str) -> None:
        from microvm.sandbox.v1 import sandbox_service_pb2_grpc

        self.channel = grpc.aio.insecure_channel(address)
        self.stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.key = key


async def start_installation(node: InProcessNode, http_port: int = 0) -> None:
    """Every service of a one-node installation in this loop: auth and gateway too (auth required). The gateway's
    HTTP/JSON door binds `http_port` (0: any free port, never one probed free earlier that another server of this
    process may take meanwhile); where it bound is then in `node.http` and in the gateway's settings."""
    for kind in ("auth", "snapshot", "network", "relay", "compute"):
        await node.start(kind)
    await node.start("gateway", listen="127.0.0.1:0", http_listen=f"127.0.0.1:{http_port}")
    bound = await node.registration_metadata("gateway", "http")
    node.settings["gateway"]["http_listen"] = bound
    node.http = f"http://{bound}"


async def tenant_caller(node: InProcessNode, tenant: str, role: int | None = None, **quota) -> Caller:
    """A tenant with `quota` (generous by default) and a key of `role` (developer by default)."""
    from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
    from microvm.types.v1 import auth_pb2 as auth_types

    auth = auth_pb2_grpc.AuthServiceStub(node.channel(await node.address("auth")))
    limits = {"max_sandboxes": 50, "max_vcpus": 100, "max_memory_mib": 51200, "max_snapshot_bytes": 50 << 30, **quota}
    await auth.CreateTenant(auth_pb2.CreateTenantRequest(tenant=tenant, quota=auth_types.Quota(**limits)), timeout=10)
    key = await auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(tenant=tenant, principal=f"{tenant}-user", role=role or auth_types.ROLE_DEVELOPER),
        timeout=10,
    )
    return Caller(await node.address("gateway"), key.secret)
