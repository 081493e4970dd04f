"""`Sandbox.forward_port` for synchronous code: an `AsyncPortForward` (microvm_sandbox.port_forward) whose listener and
connections run on the sync SDK's loop thread, so forwarding goes on while the calling thread does anything else.

    with sb.forward_port(8000) as forward:
        urllib.request.urlopen(f"http://{forward.local_address}/").read()
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from microvm_sandbox.errors import SandboxError
from microvm_sandbox.port_forward import AsyncPortForward, ErrorCallback

if TYPE_CHECKING:
    from microvm_sandbox.aio import AsyncSandbox
    from microvm_sandbox.sync_loop import Loop


class PortForward:
    """A local TCP listener whose connections each reach `guest_port` on the sandbox's loopback (the sync twin of
    `AsyncPortForward`). `close()` (or leaving `with`) stops listening and ends the connections still open."""

    def __init__(self, inner: AsyncPortForward, loop: Loop) -> None:
        self.aio = inner
        self._loop = loop

    @property
    def sandbox(self) -> str:
        """The sandbox's name, `sandboxes/{id}`."""
        return self.aio.sandbox

    @property
    def guest_port(self) -> int:
        """The port on the sandbox's loopback each connection reaches."""
        return self.aio.guest_port

    @property
    def local_host(self) -> str:
        """The local address it listens on."""
        return self.aio.local_host

    @property
    def local_port(self) -> int:
        """The local port it listens on (the one the system picked when asked for 0)."""
        return self.aio.local_port

    @property
    def local_address(self) -> str:
        """`host:port` it listens on, e.g. `127.0.0.1:8080`."""
        return self.aio.local_address

    @property
    def connections(self) -> int:
        """How many forwarded connections are open now."""
        return self.aio.connections

    @property
    def errors(self) -> deque[SandboxError]:
        """The errors of the last 32 connections that failed, oldest first."""
        return self.aio.errors

    @property
    def last_error(self) -> SandboxError | None:
        """The error of the newest connection that failed, if any."""
        return self.aio.last_error

    def close(self) -> None:
        """Stops listening and ends the connections still open. A second close is a no-op."""
        self._loop.run(self.aio.close())

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PortForward {self.local_address} -> {self.sandbox}:{self.guest_port}>"


class PortForwardMethods:
    """`Sandbox`'s `forward_port` (the sandbox provides `aio` and `_loop`)."""

    aio: AsyncSandbox
    _loop: Loop

    def forward_port(
        self,
        guest_port: int,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        on_error: ErrorCallback | None = None,
    ) -> PortForward:
        """Listens on local_host:local_port (0: a free port) and forwards each connection to `guest_port` on the
        sandbox's loopback (see `AsyncSandbox.forward_port`); returns the started `PortForward`, which `with`
        closes at the end. `on_error` is called in the SDK's loop thread."""
        started = self._loop.run(self.aio.forward_port(guest_port, local_port, local_host, on_error))
        return PortForward(started, self._loop)


__all__ = ["PortForward", "PortForwardMethods"]
