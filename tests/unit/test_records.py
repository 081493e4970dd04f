"""The declared records: the key layout doc agrees with them, legacy JSON is read and rewritten, the public API's
copies of shared messages stay wire-identical."""

from __future__ import annotations

import json
import re

import pytest

from microvm.sandbox.v1 import sandbox_pb2
from microvm.types.v1 import network_pb2, vm_pb2
from microvm.types.v1 import sandbox_pb2 as sandbox_types
from services.common.records import (
    ADDRESSES,
    ALL_KINDS,
    ATTACHMENTS,
    QUOTA_RELEASES,
    SANDBOXES,
    SERVICES,
    VMS,
    RecordCorrupt,
    Records,
)
from tests.stack import REPO

DOC = (REPO / "docs" / "etcd-keys.md").read_text()


def declared_messages():
    seen: dict[str, object] = {}

    def walk(descriptor):
        if descriptor.full_name in seen or descriptor.GetOptions().map_entry:
            return
        seen[descriptor.full_name] = descriptor
        for field in descriptor.fields:
            if field.message_type is not None and field.message_type.full_name.startswith("microvm.types"):
                walk(field.message_type)

    for kind in ALL_KINDS:
        walk(kind.message.DESCRIPTOR)
    return seen


def test_the_key_table_lists_every_declared_kind_with_its_message_and_writer():
    rows = {}
    for line in DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`/microvm/"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    declared = {k.pattern: (k.message.DESCRIPTOR.full_name, k.writer) for k in ALL_KINDS}
    assert rows == declared


def test_the_field_lists_equal_the_declared_messages():
    documented = {
        m.group(1): [f.strip("` ") for f in m.group(2).split(",")]
        for m in re.finditer(r"### `([\w.]+)`\n\n(.+)\n", DOC)
    }
    declared = {name: [f.name for f in d.fields] for name, d in declared_messages().items()}
    assert documented == declared


def test_every_record_kind_holds_a_message_of_the_types_package():
    for kind in ALL_KINDS:
        assert kind.message.DESCRIPTOR.file.package == "microvm.types.v1", kind.pattern


def test_service_protos_import_only_types_and_google():
    for proto in (REPO / "protos" / "microvm").glob("*/v1/*.proto"):
        package = proto.parent.parent.name
        for imported in re.findall(r'^import "([^"]+)";', proto.read_text(), re.M):
            allowed = imported.startswith(("google/", "microvm/types/", f"microvm/{package}/"))
            assert allowed, f"{proto.relative_to(REPO)} imports {imported}"


def test_keys_are_built_and_parsed_by_their_pattern():
    assert ATTACHMENTS.key("n1", "sbx-1") == b"/microvm/network/n1/attachments/sbx-1"
    assert ATTACHMENTS.scope("n1") == b"/microvm/network/n1/attachments/"
    assert ATTACHMENTS.parts_of(b"/microvm/network/n1/attachments/sbx-1") == ("n1", "sbx-1")
    # The other kind under the same prefix is not mistaken for this one.
    assert ATTACHMENTS.parts_of(ADDRESSES.key("n1", "10.0.0.2")) is None
    with pytest.raises(ValueError):
        VMS.key("n1", "../etc")


@pytest.mark.parametrize(
    "public,declared",
    [
        (sandbox_pb2.NetworkPolicy, network_pb2.NetworkPolicy),
        (sandbox_pb2.EgressRule, network_pb2.EgressRule),
        (sandbox_pb2.ExposedPort, network_pb2.ExposedPort),
    ],
)
def test_the_public_copies_of_shared_messages_are_wire_identical(public, declared):
    def shape(descriptor):
        return [(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields]

    assert shape(public.DESCRIPTOR) == shape(declared.DESCRIPTOR)


def test_record_states_have_the_public_numbers():
    for value in sandbox_types.SandboxRecordState.DESCRIPTOR.values:
        public = value.name.replace("SANDBOX_RECORD_STATE_", "SANDBOX_STATE_")
        assert sandbox_pb2.SandboxState.Value(public) == value.number
    assert network_pb2.EgressMode.items() == sandbox_pb2.EgressMode.items()


LEGACY_VM = {
    "id": "sbx-1",
    "node": "n1",
    "template": "default",
    "image_dir": "/img",
    "vcpus": 2,
    "memory_mib": 512,
    "hostname": "sbx-1",
    "vmm": "qemu",
    "accel": "tcg",
    "directory": "/vms/sbx-1",
    "state": "PAUSED",
    "pid": 42,
    "agent_socket": "/vms/sbx-1/agent.sock",
    "agent_transport": "virtio-serial",
    "create_time": 1700000000.5,
    "failure_message": "",
    "tap_device": "mvt0123456789a",
    "mac_address": "0a:58:0a:d5:00:02",
    "guest_cidr": "10.213.0.2/20",
    "gateway": "10.213.0.1",
    "dns_servers": ["10.0.0.53"],
    "boot_hostname": "pool-x",
    "source_snapshot": "",
    "ram_path": "/ram/x",
    "ram_shared": False,
    "start_method": "warm-pool",
    "pooled": False,
}
LEGACY_SANDBOX = {
    "sandbox": {
        "name": "sandboxes/sbx-1",
        "template": "default",
        "state": "SANDBOX_STATE_RUNNING",
        "vcpus": 2,
        "memoryMib": 512,
        "labels": {"team": "a"},
        "node": "n1",
        "networkPolicy": {"egress": "EGRESS_MODE_ALLOW_LIST", "allow": [{"cidr": "10.0.0.0/8", "ports": [443]}]},
        "createTime": "2026-11-28T10:00:00Z",
        "sourceSnapshot": "snapshots/snap-1",
        "exposedPorts": [{"guestPort": 80, "hostAddress": "127.0.0.1", "hostPort": 40000}],
    },
    "timeout_seconds": 600,
    "expire_at": 1700000600.0,
    "agent_socket": "/x",
    "agent_transport": "virtio-serial",
    "tenant": "acme",
}


def test_legacy_vm_and_sandbox_records_are_read():
    vm = VMS.decode(json.dumps(LEGACY_VM).encode(), VMS.key("n1", "sbx-1"))
    assert (vm.state, vm.pid, vm.agent.socket_path, vm.nic.guest_cidr) == (
        vm_pb2.VM_STATE_PAUSED,
        42,
        "/vms/sbx-1/agent.sock",
        "10.213.0.2/20",
    )
    sandbox = SANDBOXES.decode(json.dumps(LEGACY_SANDBOX).encode(), SANDBOXES.key("sbx-1"))
    assert (sandbox.id, sandbox.tenant, sandbox.state, sandbox.source_snapshot) == (
        "sbx-1",
        "acme",
        sandbox_types.SANDBOX_RECORD_STATE_RUNNING,
        "snap-1",
    )
    assert sandbox.network_policy.allow[0].ports == [443] and sandbox.exposed_ports[0].host_port == 40000
    assert sandbox.expire_time.seconds == 1700000600


def test_a_value_that_is_neither_declared_nor_legacy_is_reported_not_guessed():
    with pytest.raises(RecordCorrupt):
        VMS.decode(b"\xff\xff\xff garbage")


async def test_writers_rewrite_legacy_records_once_and_leave_others_alone(etcd, node_name):
    records = Records(etcd)
    await etcd.put(VMS.key(node_name, "sbx-1"), json.dumps(dict(LEGACY_VM, node=node_name)).encode())
    await etcd.put(ADDRESSES.key(node_name, "10.213.0.2"), b"sbx-1")
    await etcd.put(QUOTA_RELEASES.key(f"snap-{node_name}"), b"acme")
    current = vm_pb2.VmRecord(id="sbx-2", node=node_name)
    await records.put(VMS, current, node_name, "sbx-2")
    assert await records.migrate(VMS, node_name) == 1
    assert await records.migrate(VMS, node_name) == 0
    assert await records.migrate(ADDRESSES, node_name) == 1
    assert await records.migrate(QUOTA_RELEASES) >= 1
    raw = await etcd.get(VMS.key(node_name, "sbx-1"))
    assert vm_pb2.VmRecord.FromString(raw.value).pid == 42
    assert (await records.get(ADDRESSES, node_name, "10.213.0.2")).message.sandbox_id == "sbx-1"
    release = (await records.get(QUOTA_RELEASES, f"snap-{node_name}")).message
    assert (release.tenant, release.reservation_id) == ("acme", f"snapshot-snap-{node_name}")
    assert (await records.get(VMS, node_name, "sbx-2")).message == current


async def test_legacy_service_registrations_are_read(etcd):
    legacy = {"address": "127.0.0.1:5", "pid": 7, "started": 1.5, "metadata": {"node": "n1", "vmm": "qemu"}}
    registration = SERVICES.decode(json.dumps(legacy).encode(), SERVICES.key("compute", "c-1"))
    assert (registration.node, registration.metadata["vmm"], registration.pid) == ("n1", "qemu", 7)


def test_no_two_kinds_share_a_key_pattern():
    patterns = [k.pattern for k in ALL_KINDS]
    assert len(patterns) == len(set(patterns))
