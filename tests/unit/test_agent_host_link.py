"""The agent waiting for its host (guest_agents/.../host_link.py): asleep until the port signals a change of the
host's side, instead of polling every 20 ms. A socket pair stands in for the virtio-serial port: with O_ASYNC a
socket signals SIGIO when data arrives, as the port does when the host connects; whether the host is connected is
the test's to say."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest_agents" / "linux"))

from microvm_agent.host_link import HostLink, host_disconnected  # noqa: E402

pytestmark = pytest.mark.timeout(20)


class Port:
    """One end of a socket pair as the agent's port; `connect()` plays the host: connected, and the signal."""

    def __init__(self) -> None:
        self.port, self.host = socket.socketpair()
        self.port.setblocking(False)
        self.connected = False
        self.checks = 0

    def disconnected(self, fd: int) -> bool:
        assert fd == self.port.fileno()
        self.checks += 1
        return not self.connected

    def connect(self) -> None:
        self.connected = True
        self.host.send(b"x")

    def is_async(self) -> bool:
        return bool(fcntl.fcntl(self.port.fileno(), fcntl.F_GETFL) & os.O_ASYNC)


@pytest.fixture
def port():
    stand_in = Port()
    yield stand_in
    stand_in.port.close()
    stand_in.host.close()


async def test_a_connected_host_is_not_waited_for(port):
    port.connected = True
    await HostLink(port.port.fileno(), port.disconnected).until_connected()
    assert port.checks == 1 and not port.is_async()


async def test_the_wait_sleeps_until_the_host_connects(port):
    # No backstop within the test: only the signal can end the wait (else the test's timeout fails it).
    link = HostLink(port.port.fileno(), port.disconnected, backstop_seconds=3600)
    waiting = asyncio.create_task(link.until_connected())
    await asyncio.sleep(0.05)
    asleep = port.checks
    await asyncio.sleep(0.3)
    assert not waiting.done()
    assert port.checks == asleep, "the wait polled the port instead of sleeping"  # the old loop: ~15 checks more
    assert port.is_async()  # signalled while it waits
    port.connect()
    await waiting
    assert not port.is_async()  # not while serving: the port would signal every frame


async def test_a_signal_while_still_disconnected_goes_back_to_sleep(port):
    link = HostLink(port.port.fileno(), port.disconnected, backstop_seconds=3600)
    waiting = asyncio.create_task(link.until_connected())
    await asyncio.sleep(0.1)
    asleep = port.checks
    port.host.send(b"x")  # a signal, the host still away (it connected and left again)
    while port.checks == asleep:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not waiting.done() and port.checks == asleep + 1  # one look, then asleep again
    port.connect()
    await waiting


async def test_the_backstop_finds_a_change_that_came_without_its_signal(port):
    link = HostLink(port.port.fileno(), port.disconnected, backstop_seconds=0.05)
    waiting = asyncio.create_task(link.until_connected())
    await asyncio.sleep(0.1)
    port.connected = True  # no data, no signal
    await waiting
    assert not port.is_async()


def test_a_hung_up_peer_reads_as_disconnected():
    here, there = socket.socketpair()
    assert not host_disconnected(here.fileno())
    there.close()
    assert host_disconnected(here.fileno())
    here.close()
