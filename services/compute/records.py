"""VM records: what compute knows about each VM, kept in etcd at `/microvm/vms/<node>/<vm-id>`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from google.protobuf import timestamp_pb2

from microvm.compute.v1 import compute_pb2
from services.common.agent_channel import AgentTarget

VMS_PREFIX = "/microvm/vms/"

STATES = {
    "CREATING": compute_pb2.VM_STATE_CREATING,
    "RUNNING": compute_pb2.VM_STATE_RUNNING,
    "PAUSED": compute_pb2.VM_STATE_PAUSED,
    "STOPPED": compute_pb2.VM_STATE_STOPPED,
    "FAILED": compute_pb2.VM_STATE_FAILED,
}


@dataclass
class VmRecord:
    id: str
    node: str
    template: str
    image_dir: str
    vcpus: int
    memory_mib: int
    hostname: str
    vmm: str
    accel: str
    directory: str
    state: str = "CREATING"
    pid: int = 0
    agent_socket: str = ""
    agent_transport: str = "virtio-serial"
    create_time: float = field(default_factory=time.time)
    failure_message: str = ""
    # Network attachment (empty without networking): TAP on the node's bridge and the guest's side of it.
    tap_device: str = ""
    mac_address: str = ""
    guest_cidr: str = ""
    gateway: str = ""
    dns_servers: list[str] = field(default_factory=list)
    # Host name on the kernel command line: a restored VM keeps its source's so the device
    # configuration matches the migrated state; its real host name is set through the agent.
    boot_hostname: str = ""
    # Snapshot this VM was restored from; empty for a cold boot.
    source_snapshot: str = ""
    # File backing guest RAM (empty: anonymous memory). Shared: the VM writes through to the file, so a
    # snapshot only copies the file; private: copy-on-write over a snapshot's file, shared between clones.
    ram_path: str = ""
    ram_shared: bool = False
    start_method: str = "cold-boot"
    # A warm-pool VM: restored and paused, not yet handed out; not counted as used capacity.
    pooled: bool = False

    @property
    def key(self) -> str:
        return f"{VMS_PREFIX}{self.node}/{self.id}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> VmRecord:
        data = json.loads(value)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def agent_target(self) -> AgentTarget:
        return AgentTarget(vm_id=self.id, socket_path=self.agent_socket, transport=self.agent_transport)

    @property
    def holds_resources(self) -> bool:
        return self.state in ("CREATING", "RUNNING", "PAUSED") and not self.pooled

    def to_proto(self) -> compute_pb2.Vm:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(self.create_time * 1e9))
        transport = {
            "virtio-serial": compute_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL,
            "hybrid-vsock": compute_pb2.AGENT_TRANSPORT_HYBRID_VSOCK,
        }[self.agent_transport]
        return compute_pb2.Vm(
            id=self.id,
            template=self.template,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            state=STATES[self.state],
            pid=self.pid if self.state in ("RUNNING", "PAUSED") else 0,
            vmm=self.vmm,
            accel=self.accel,
            node=self.node,
            create_time=created,
            failure_message=self.failure_message,
            hostname=self.hostname,
            tap_device=self.tap_device,
            start_method=self.start_method,
            ip_address=self.guest_cidr.partition("/")[0],
            agent=compute_pb2.AgentEndpoint(transport=transport, socket_path=self.agent_socket),
        )
