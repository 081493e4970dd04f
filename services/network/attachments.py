"""Attachments: a sandbox's place on its node's network, kept in etcd.

`/microvm/network/<node>/attachments/<sandbox-id>` holds a `microvm.types.v1.Attachment` (TAP device, address,
MAC, egress policy, exposed ports). The records are the whole truth: the devices, nftables rules and port
listeners of a node are rebuilt from them, so a restarted network service ends up exactly where the records say.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from microvm.types.v1 import network_pb2
from services.common.records import ADDRESSES, ATTACHMENTS, Records


@dataclass
class ExposedPort:
    guest_port: int
    host_address: str
    host_port: int

    def to_proto(self) -> network_pb2.ExposedPort:
        return network_pb2.ExposedPort(
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
    network_policy: network_pb2.NetworkPolicy = field(default_factory=network_pb2.NetworkPolicy)
    exposed_ports: list[ExposedPort] = field(default_factory=list)

    @property
    def guest_cidr(self) -> str:
        return f"{self.address}/{self.prefix_length}"

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

    @classmethod
    def from_proto(cls, record: network_pb2.Attachment) -> Attachment:
        address, _, prefix = record.guest_cidr.partition("/")
        return cls(
            sandbox_id=record.sandbox_id,
            tap_device=record.tap_device,
            address=address,
            prefix_length=int(prefix or 32),
            gateway=record.gateway,
            mac_address=record.mac_address,
            dns_servers=list(record.dns_servers),
            network_policy=record.policy,
            exposed_ports=[ExposedPort(p.guest_port, p.host_address, p.host_port) for p in record.exposed_ports],
        )


def mac_for(address: str) -> str:
    """A locally administered unicast MAC derived from the IPv4 address: unique on the node's bridge."""
    packed = ipaddress.IPv4Address(address).packed
    return "0a:58:" + ":".join(f"{b:02x}" for b in packed)


class AttachmentStore:
    def __init__(self, etcd, node: str) -> None:
        self.records = Records(etcd)
        self.node = node

    def _record(self, attachment: Attachment) -> network_pb2.Attachment:
        record = attachment.to_proto()
        record.update_time.GetCurrentTime()
        return record

    async def get(self, sandbox_id: str) -> Attachment | None:
        stored = await self.records.get(ATTACHMENTS, self.node, sandbox_id)
        return Attachment.from_proto(stored.message) if stored else None

    async def all(self) -> dict[str, Attachment]:
        return {s.parts[1]: Attachment.from_proto(s.message) for s in await self.records.list(ATTACHMENTS, self.node)}

    async def put(self, attachment: Attachment) -> None:
        await self.records.put(ATTACHMENTS, self._record(attachment), self.node, attachment.sandbox_id)

    async def delete(self, sandbox_id: str) -> None:
        await self.records.delete(ATTACHMENTS, self.node, sandbox_id)

    async def move(self, old_id: str, attachment: Attachment) -> bool:
        """Re-keys `old_id`'s record and its address as `attachment.sandbox_id` in one transaction.

        False when `old_id` has no record or the new id already has one."""
        new_id = attachment.sandbox_id
        tx = self.records.etcd.transactions
        old_key = ATTACHMENTS.key(self.node, old_id)
        return await self.records.transaction(
            compare=[tx.version(old_key) > 0, self.records.unchanged(ATTACHMENTS, 0, self.node, new_id)],
            success=[
                self.records.delete_op(ATTACHMENTS, self.node, old_id),
                self.records.put_op(ATTACHMENTS, self._record(attachment), self.node, new_id),
                self.records.put_op(
                    ADDRESSES, network_pb2.AddressLease(sandbox_id=new_id), self.node, attachment.address
                ),
            ],
        )
