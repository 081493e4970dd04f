"""The installation's first credentials, and the operator's way to internal services."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc

from microvm.auth.v1 import auth_pb2, auth_pb2_grpc
from microvm.types.v1 import auth_pb2 as auth_types
from services.common import deadlines
from services.common.pki import TLS_CHANNEL_OPTIONS, Identity, load_identity
from services.common.registry import SERVICES_PREFIX, ServiceInstance, etcd_client

DEFAULT_QUOTA = auth_types.Quota(
    max_sandboxes=200, max_vcpus=400, max_memory_mib=200 * 1024, max_snapshot_bytes=200 << 30
)


async def _first_key(instances: list[ServiceInstance], pki_dir: Path | None) -> auth_pb2.CreateApiKeyResponse:
    """The `default` tenant and its admin key, made by the newest auth replica that answers."""
    for instance in instances:
        async with operator_channel(instance.address, "auth", pki_dir) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            try:
                await auth.CreateTenant(
                    auth_pb2.CreateTenantRequest(tenant="default", quota=DEFAULT_QUOTA),
                    timeout=deadlines.CONTROL,
                    wait_for_ready=True,
                )
                return await auth.CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(tenant="default", principal="admin", role=auth_types.ROLE_ADMIN),
                    timeout=deadlines.CONTROL,
                )
            except grpc.aio.AioRpcError as exc:
                if (
                    exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    or instance is instances[-1]
                ):
                    raise
    raise RuntimeError("no auth instance")


def operator_channel(address: str, kind: str, pki_dir: Path | None) -> grpc.aio.Channel:
    """A channel to a service as the operator: mutual TLS for internal services when the PKI exists."""
    if pki_dir is not None and (pki_dir / "operator.crt").exists() and kind != "gateway":
        identity = load_identity(pki_dir, "operator")
        return grpc.aio.secure_channel(address, identity.channel_credentials(), options=TLS_CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address)


async def bootstrap_admin_key(
    etcd_endpoints: list[str],
    pki_dir: Path | None,
    key_file: Path,
    stopping: asyncio.Event | None = None,
    etcd_identity: Identity | None = None,
) -> bool:
    """Once per installation: a `default` tenant and an admin API key, written to `key_file` (mode 0600). Waits for
    an auth instance to register; False if `stopping` was set first or the key file exists already."""
    if key_file.exists():
        return False
    stopping = stopping or asyncio.Event()
    client = etcd_client(etcd_endpoints, timeout=2, identity=etcd_identity)
    await client.connect()
    try:
        while not stopping.is_set():
            instances = [
                ServiceInstance.decode(kv.key, kv.value)
                for kv in await client.get_prefix(f"{SERVICES_PREFIX}auth/".encode())
            ]
            if instances:
                break
            await asyncio.sleep(0.1)
        else:
            return False
    finally:
        await client.close()
    key = await _first_key(sorted(instances, key=lambda i: -i.started), pki_dir)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.secret + "\n")
    os.rename(key_file.with_suffix(".tmp"), key_file)
    print(json.dumps({"event": "admin_key_created", "path": str(key_file)}), flush=True)
    return True


async def create_api_key(
    etcd_endpoints: list[str],
    pki_dir: Path | None,
    request: auth_pb2.CreateApiKeyRequest,
    etcd_identity: Identity | None = None,
) -> auth_pb2.CreateApiKeyResponse:
    """Another API key (`mvm keys create`), made by the newest auth replica as the operator (auth's CreateApiKey is
    internal: the operator certificate in the PKI directory is what allows it)."""
    client = etcd_client(etcd_endpoints, timeout=2, identity=etcd_identity)
    await client.connect()
    try:
        registered = await client.get_prefix(f"{SERVICES_PREFIX}auth/".encode())
        instances = [ServiceInstance.decode(kv.key, kv.value) for kv in registered]
    finally:
        await client.close()
    if not instances:
        raise RuntimeError("no auth service is registered: is the installation up?")
    newest = max(instances, key=lambda i: i.started)
    async with operator_channel(newest.address, "auth", pki_dir) as channel:
        return await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(request, timeout=deadlines.CONTROL)
