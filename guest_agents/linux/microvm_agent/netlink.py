"""The NIC's MAC, address and default route set over rtnetlink from the agent itself, not by running `ip`.

A restored or forked guest is given its own address right after it wakes, inside a VMM whose code cache is empty
under TCG: starting iproute2 there (a new process, a dozen shared libraries to load and relocate) took 0.9-2.1 s per
clone in a fork of 10 on 2 cores, most of each clone's start. The same steps as netlink messages from the running
agent are a handful of syscalls. What each step does is what `ip` does for the same command.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

RTM_NEWLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 20, 21, 22
RTM_NEWROUTE, RTM_DELNEIGH, RTM_GETNEIGH = 24, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
LINK = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
ADDRESS = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
ROUTE = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst len, src len, tos, table, protocol, scope, type, flags
NEIGHBOUR = struct.Struct("=BxxxiHBB")  # ndmsg: family, index, state, flags, type


def attribute(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


class Netlink:
    """One rtnetlink socket; every change is acknowledged (an error raises OSError with the kernel's errno)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sequence = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self.sequence += 1
        self.sock.send(HEADER.pack(HEADER.size + len(payload), kind, NLM_F_REQUEST | flags, self.sequence, 0) + payload)
        return self.sequence

    def _replies(self, sequence: int):
        """(type, payload) of each message answering `sequence`, until its ack or the end of its dump."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
                if length < HEADER.size:
                    raise OSError(errno.EPROTO, "a malformed netlink message")
                payload = data[offset + HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if seq != sequence:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                if kind == NLMSG_DONE:
                    return
                yield kind, payload
                if not flags & NLM_F_MULTI:
                    return

    def change(self, kind: int, payload: bytes, flags: int = 0) -> None:
        for _ in self._replies(self._send(kind, NLM_F_ACK | flags, payload)):
            pass

    def remove(self, kind: int, payload: bytes) -> None:
        """A deletion of something that may be gone already (then nothing happens)."""
        try:
            self.change(kind, payload)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EADDRNOTAVAIL, errno.ESRCH):
                raise

    def dump(self, kind: int, payload: bytes) -> list[bytes]:
        return [reply for _, reply in self._replies(self._send(kind, NLM_F_DUMP, payload))]


def configure(interface: str, mac_address: str, address_cidr: str, gateway: str) -> None:
    """`ip link set down; link set address; addr flush; addr add; link set up; neigh flush; route replace default`:
    the NIC's MAC, its one address and the default route, replacing whatever a snapshot carried."""
    # Everything parsed first (ValueError): a malformed request changes nothing.
    index = socket.if_nametoindex(interface)
    address = ipaddress.IPv4Interface(address_cidr)
    mac = bytes.fromhex(mac_address.replace(":", "")) if mac_address else b""
    if mac and len(mac) != 6:
        raise ValueError(f"{mac_address!r} is not a MAC address")
    router = ipaddress.IPv4Address(gateway).packed if gateway else b""
    with Netlink() as netlink:
        netlink.change(RTM_NEWLINK, LINK.pack(socket.AF_UNSPEC, 0, index, 0, IFF_UP))
        if mac:
            netlink.change(RTM_NEWLINK, LINK.pack(socket.AF_UNSPEC, 0, index, 0, 0) + attribute(IFLA_ADDRESS, mac))
        for reply in netlink.dump(RTM_GETADDR, ADDRESS.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if ADDRESS.unpack_from(reply)[4] == index:
                netlink.remove(RTM_DELADDR, reply)  # a primary's secondaries go with it
        local = address.ip.packed
        netlink.change(
            RTM_NEWADDR,
            ADDRESS.pack(socket.AF_INET, address.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + attribute(IFA_LOCAL, local)
            + attribute(IFA_ADDRESS, local),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        netlink.change(RTM_NEWLINK, LINK.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP))
        for reply in netlink.dump(RTM_GETNEIGH, NEIGHBOUR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _, neighbour_index, state, _, _ = NEIGHBOUR.unpack_from(reply)
            if neighbour_index == index and not state & (NUD_NOARP | NUD_PERMANENT):
                netlink.remove(RTM_DELNEIGH, reply)
        if router:
            netlink.change(
                RTM_NEWROUTE,
                ROUTE.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                + attribute(RTA_GATEWAY, router)
                + attribute(RTA_OIF, struct.pack("=i", index)),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
