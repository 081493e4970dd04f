"""Waiting for the host to connect to the agent's virtio-serial port, asleep.

While no host side is connected, the port polls hung-up at once, level-triggered: the loop cannot wait on it. The
agent polled it every 20 ms instead, and under TCG each poll is Python and kernel code the VMM runs translated: an
idle sandbox whose relay had restarted (the relay reconnects a guest when a call needs it) used 25-29 ms of CPU a
second instead of 3-4, and a guest just restored with no host yet about 110. With 200 idle sandboxes, one relay
restart asked 2 cores for 5.

virtio_console sends SIGIO to an `O_ASYNC` port's owner whenever the host's side opens or closes it (the
VIRTIO_CONSOLE_PORT_OPEN control message), so the agent sleeps until then: 3-6 ms a second after a relay restart,
17 for the restored guest. `O_ASYNC` is on only while it waits: the driver also signals every buffer that arrives,
one signal per frame while serving. A slow poll stays as a backstop, should a change ever come without its signal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
from collections.abc import Callable

BACKSTOP_SECONDS = 2.0


def host_disconnected(fd: int) -> bool:
    """Whether the port reports its host side hung up (no host connected)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class HostLink:
    """The host side of the port at `fd`: `until_connected` returns once a host is connected."""

    def __init__(
        self,
        fd: int,
        disconnected: Callable[[int], bool] = host_disconnected,
        backstop_seconds: float = BACKSTOP_SECONDS,
    ) -> None:
        self.fd = fd
        self._disconnected = disconnected
        self._backstop = backstop_seconds
        self._changed = asyncio.Event()
        # Installed for good: a SIGIO still pending once O_ASYNC is off must find a handler, not the default action.
        asyncio.get_running_loop().add_signal_handler(signal.SIGIO, self._changed.set)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())

    async def until_connected(self) -> None:
        if not self._disconnected(self.fd):
            return
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        try:
            while True:
                self._changed.clear()  # before the check: a change right after it still wakes the wait
                if not self._disconnected(self.fd):
                    return
                try:
                    await asyncio.wait_for(self._changed.wait(), self._backstop)
                except TimeoutError:
                    pass
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_ASYNC)
