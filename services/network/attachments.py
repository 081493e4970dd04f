"""Attachments: a sandbox's place on its node's network, kept in etcd.

`/microvm/network/<node>/attachments/<sandbox-id>` holds one JSON record (TAP device, address, MAC, egress
policy, exposed ports). The records are the whole truth: the devices, nftables rules and port listeners of a
node are rebuilt from them, so a restarted network service ends up exactly where the records say.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field

from google.protobuf import json_format

from microvm.network.v1 import network_pb2
from microvm.sandbox.v1 import sandbox_pb2
from services.network.addresses import PREFIX


@dataclass
class ExposedPort:
    guest_port: int
    host_address: str
    host_port: int

    def to_proto(self) -> sandbox_pb2.ExposedPort:
        return sandbox_pb2.ExposedPort(
            guest_port=self.guest_port, host_address=self.host_address, host_port=self.host_port
        )


@dataclass
class Attachment:
    sandbox_id: str
    tap_device: str
    address: str
    prefix_length: int
    gateway: str
    mac_address: str
    dns_servers: list[str] = field(default_factory=list)
    # NetworkPolicy as proto JSON.
    policy: dict = field(default_factory=dict)
    exposed_ports: list[ExposedPort] = field(default_factory=list)
    update_time: float = field(default_factory=time.time)

    @property
    def guest_cidr(self) -> str:
        return f"{self.address}/{self.prefix_length}"

    @property
    def network_policy(self) -> sandbox_pb2.NetworkPolicy:
        return json_format.ParseDict(self.policy, sandbox_pb2.NetworkPolicy())

    @network_policy.setter
    def network_policy(self, policy: sandbox_pb2.NetworkPolicy) -> None:
        self.policy = json_format.MessageToDict(policy)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes) -> Attachment:
        data = json.loads(value)
        data["exposed_ports"] = [ExposedPort(**p) for p in data.get("exposed_ports", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_proto(self) -> network_pb2.Attachment:
        return network_pb2.Attachment(
            sandbox_id=self.sandbox_id,
            tap_device=self.tap_device,
            guest_cidr=self.guest_cidr,
            gateway=self.gateway,
            dns_servers=self.dns_servers,
            mac_address=self.mac_address,
            policy=self.network_policy,
            exposed_ports=[p.to_proto() for p in self.exposed_ports],
        )


def mac_for(address: str) -> str:
    """A locally administered unicast MAC derived from the IPv4 address: unique on the node's bridge."""
    packed = ipaddress.IPv4Address(address).packed
    return "0a:58:" + ":".join(f"{b:02x}" for b in packed)


class AttachmentStore:
    def __init__(self, etcd, node: str) -> None:
        self.etcd = etcd
        self.prefix = f"{PREFIX}{node}/attachments/"

    def _key(self, sandbox_id: str) -> bytes:
        return f"{self.prefix}{sandbox_id}".encode()

    async def get(self, sandbox_id: str) -> Attachment | None:
        result = await self.etcd.get(self._key(sandbox_id))
        return Attachment.decode(result.value) if result else None

    async def all(self) -> dict[str, Attachment]:
        result = await self.etcd.get_prefix(self.prefix.encode())
        return {kv.key.decode()[len(self.prefix) :]: Attachment.decode(kv.value) for kv in result}

    async def put(self, attachment: Attachment) -> None:
        attachment.update_time = time.time()
        await self.etcd.put(self._key(attachment.sandbox_id), attachment.encode())

    async def delete(self, sandbox_id: str) -> None:
        await self.etcd.delete(self._key(sandbox_id))

    async def move(self, old_id: str, attachment: Attachment, address_key: bytes) -> bool:
        """Re-keys `old_id`'s record and its address as `attachment.sandbox_id` in one transaction.

        False when `old_id` has no record or the new id already has one."""
        tx = self.etcd.transactions
        attachment.update_time = time.time()
        new_id = attachment.sandbox_id
        ok, _ = await self.etcd.transaction(
            compare=[tx.version(self._key(old_id)) > 0, tx.version(self._key(new_id)) == 0],
            success=[
                tx.delete(self._key(old_id)),
                tx.put(self._key(new_id), attachment.encode()),
                tx.put(address_key, new_id.encode()),
            ],
            failure=[],
        )
        return ok
