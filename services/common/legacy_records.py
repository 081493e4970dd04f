"""Readers of the JSON (and plain text) records that releases before the declared messages wrote to etcd.

Each converter takes the parsed legacy value and the key's parts and returns the declared message. Writers
rewrite their records once at start (`Records.migrate`); until then readers use these too.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2

from microvm.types.v1 import auth_pb2, network_pb2, sandbox_pb2, service_pb2, snapshot_pb2, vm_pb2

_VM_STATES = {
    name: vm_pb2.VmState.Value(f"VM_STATE_{name}") for name in ("CREATING", "RUNNING", "PAUSED", "STOPPED", "FAILED")
}
_TRANSPORTS = {
    "virtio-serial": vm_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL,
    "hybrid-vsock": vm_pb2.AGENT_TRANSPORT_HYBRID_VSOCK,
}


def _time(seconds: float | int | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(float(seconds) * 1e9))
    return stamp


def _parse(data: dict, message):
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def service_registration(data: dict, parts: tuple[str, ...]) -> service_pb2.ServiceRegistration:
    metadata = data.get("metadata") or {}
    return service_pb2.ServiceRegistration(
        address=data["address"],
        pid=int(data.get("pid", 0)),
        start_time=_time(data.get("started")),
        node=str(metadata.get("node", "")),
        metadata={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in metadata.items() if k != "node"},
    )


def vm(data: dict, parts: tuple[str, ...]) -> vm_pb2.VmRecord:
    record = vm_pb2.VmRecord(
        id=data["id"],
        node=data["node"],
        template=data["template"],
        image_dir=data.get("image_dir", ""),
        vcpus=int(data["vcpus"]),
        memory_mib=int(data["memory_mib"]),
        hostname=data.get("hostname", ""),
        vmm=data.get("vmm", ""),
        accel=data.get("accel", ""),
        directory=data.get("directory", ""),
        state=_VM_STATES.get(data.get("state", "FAILED"), vm_pb2.VM_STATE_FAILED),
        pid=int(data.get("pid") or 0),
        agent=vm_pb2.AgentEndpoint(
            transport=_TRANSPORTS.get(
                data.get("agent_transport", "virtio-serial"), vm_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL
            ),
            socket_path=data.get("agent_socket", ""),
        ),
        create_time=_time(data.get("create_time")),
        failure_message=data.get("failure_message", ""),
        boot_hostname=data.get("boot_hostname", ""),
        source_snapshot=data.get("source_snapshot", ""),
        ram_path=data.get("ram_path", ""),
        ram_shared=bool(data.get("ram_shared")),
        start_method=data.get("start_method", "cold-boot"),
        pooled=bool(data.get("pooled")),
    )
    if data.get("tap_device"):
        record.nic.CopyFrom(
            vm_pb2.GuestNic(
                tap_device=data["tap_device"],
                mac_address=data.get("mac_address", ""),
                guest_cidr=data.get("guest_cidr", ""),
                gateway=data.get("gateway", ""),
                dns_servers=data.get("dns_servers", []),
            )
        )
    return record


def sandbox(data: dict, parts: tuple[str, ...]) -> sandbox_pb2.SandboxRecord:
    public: dict[str, Any] = data.get("sandbox", {})
    state = str(public.get("state", "SANDBOX_STATE_FAILED")).replace("SANDBOX_STATE_", "SANDBOX_RECORD_STATE_")
    record = sandbox_pb2.SandboxRecord(
        id=parts[0] if parts else public.get("name", "").removeprefix("sandboxes/"),
        tenant=data.get("tenant", "default"),
        template=public.get("template", "default"),
        vcpus=int(public.get("vcpus", 1)),
        memory_mib=int(public.get("memoryMib", 256)),
        labels=public.get("labels", {}),
        timeout_seconds=int(data.get("timeout_seconds", 600)),
        expire_time=_time(data.get("expire_at")),
        node=public.get("node", ""),
        source_snapshot=public.get("sourceSnapshot", "").removeprefix("snapshots/"),
        ip_address=public.get("ipAddress", ""),
        failure_message=public.get("failureMessage", ""),
        hypervisor=public.get("hypervisor", ""),
        state=sandbox_pb2.SandboxRecordState.Value(state)
        if state in sandbox_pb2.SandboxRecordState.keys()
        else sandbox_pb2.SANDBOX_RECORD_STATE_FAILED,
    )
    _parse(public.get("networkPolicy", {}), record.network_policy)
    for port in public.get("exposedPorts", []):
        _parse(port, record.exposed_ports.add())
    for field, name in (("createTime", "create_time"), ("updateTime", "update_time")):
        if field in public:
            getattr(record, name).FromJsonString(public[field])
    return record


def snapshot(data: dict, parts: tuple[str, ...]) -> snapshot_pb2.SnapshotRecord:
    return _parse(data, snapshot_pb2.SnapshotRecord())


def pending_artifact(data: dict, parts: tuple[str, ...]) -> snapshot_pb2.PendingArtifact:
    return snapshot_pb2.PendingArtifact(artifact=_parse(data, snapshot_pb2.Artifact()))


def quota_release(tenant: str, parts: tuple[str, ...]) -> snapshot_pb2.QuotaRelease:
    return snapshot_pb2.QuotaRelease(tenant=tenant, reservation_id=f"snapshot-{parts[0]}" if parts else "")


def address_lease(sandbox_id: str, parts: tuple[str, ...]) -> network_pb2.AddressLease:
    return network_pb2.AddressLease(sandbox_id=sandbox_id)


def attachment(data: dict, parts: tuple[str, ...]) -> network_pb2.Attachment:
    record = network_pb2.Attachment(
        sandbox_id=data["sandbox_id"],
        tap_device=data["tap_device"],
        guest_cidr=f"{data['address']}/{data['prefix_length']}",
        gateway=data.get("gateway", ""),
        dns_servers=data.get("dns_servers", []),
        mac_address=data.get("mac_address", ""),
        update_time=_time(data.get("update_time")),
    )
    _parse(data.get("policy", {}), record.policy)
    for port in data.get("exposed_ports", []):
        record.exposed_ports.add(
            guest_port=port["guest_port"], host_address=port["host_address"], host_port=port["host_port"]
        )
    return record


def tenant(data: dict, parts: tuple[str, ...]) -> auth_pb2.TenantRecord:
    return auth_pb2.TenantRecord(quota=_parse(data, auth_pb2.Quota()))


def api_key(data: dict, parts: tuple[str, ...]) -> auth_pb2.ApiKeyRecord:
    return auth_pb2.ApiKeyRecord(
        tenant=data["tenant"],
        principal=data["principal"],
        role=int(data["role"]),
        sha256=data["sha256"],
        revoked=bool(data.get("revoked")),
        create_time=_time(data.get("created")),
    )


def signing_key(data: dict, parts: tuple[str, ...]) -> auth_pb2.SigningKeyRecord:
    return auth_pb2.SigningKeyRecord(
        kid=data["kid"], private_key_pem=data["private"], create_time=_time(data.get("created"))
    )


def _amount(data: dict) -> auth_pb2.QuotaAmount:
    return auth_pb2.QuotaAmount(
        **{f: int(data.get(f, 0)) for f in ("sandboxes", "vcpus", "memory_mib", "snapshot_bytes")}
    )


def quota_usage(data: dict, parts: tuple[str, ...]) -> auth_pb2.QuotaUsage:
    return auth_pb2.QuotaUsage(used=_amount(data))


def quota_reservation(data: dict, parts: tuple[str, ...]) -> auth_pb2.QuotaReservation:
    return auth_pb2.QuotaReservation(amount=_amount(data))


def audit_event(data: dict, parts: tuple[str, ...]) -> auth_pb2.AuditEvent:
    return _parse(data, auth_pb2.AuditEvent())


def audit_head(data: dict, parts: tuple[str, ...]) -> auth_pb2.AuditHead:
    return auth_pb2.AuditHead(sequence=int(data["sequence"]), hash=data["hash"])
