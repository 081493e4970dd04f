"""Port forwarding (docs/port-forward.md): `sandbox.forward_port(guest_port)` listens on a local TCP port and
carries each connection it accepts to `guest_port` on the sandbox's loopback, one PortForwardService.ForwardPort
call per connection, over the agent channel (no guest networking needed).

    async with sb.forward_port(8000) as forward:          # or: forward = await sb.forward_port(8000)
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.local_port)

Bytes go both ways as fast as the slower side takes them (a local read waits for the call's flow control, a call
read waits for the local socket to drain), so nothing buffers without bound; a local EOF is sent on as
`close_write` and the end of the call (the guest's server closed) closes the local connection. A connection that
fails (nothing listens on the guest port, the sandbox is gone) is reset, and its error kept in `errors` and
handed to `on_error` (logged as a warning when there is none); the listener goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import grpc

from microvm.sandbox.v1 import port_forward_service_pb2 as api
from microvm.sandbox.v1 import port_forward_service_pb2_grpc
from microvm_sandbox.errors import DeadlineExceededError, InvalidArgumentError, SandboxError, from_rpc_error

if TYPE_CHECKING:
    from microvm_sandbox.client import AsyncClient

CHUNK = 1 << 20  # the most one message carries (the service's bound)
READ_LIMIT = 256 << 10  # a local connection's read buffer: reading pauses past twice this
KEPT_ERRORS = 32
ErrorCallback = Callable[[SandboxError], object]

log = logging.getLogger(__name__)


class AsyncPortForward:
    """A local TCP listener whose connections each reach `guest_port` on the sandbox's loopback. `close()` (or
    leaving `async with`) stops listening and ends the connections still open."""

    def __init__(
        self,
        client: AsyncClient,
        sandbox: str,
        guest_port: int,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        on_error: ErrorCallback | None = None,
    ) -> None:
        if not 0 < guest_port < 65536:
            raise InvalidArgumentError(f"guest_port must be 1..65535, got {guest_port}", code="INVALID_ARGUMENT")
        if not 0 <= local_port < 65536:
            raise InvalidArgumentError(f"local_port must be 0..65535, got {local_port}", code="INVALID_ARGUMENT")
        self.sandbox, self.guest_port, self.local_host = sandbox, guest_port, local_host
        self.errors: deque[SandboxError] = deque(maxlen=KEPT_ERRORS)
        self._client, self._wanted_port, self._on_error = client, local_port, on_error
        self._stub = port_forward_service_pb2_grpc.PortForwardServiceStub(client.channel)  # type: ignore[no-untyped-call]
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> AsyncPortForward:
        """Starts listening (OSError when the local address or port cannot be had); returns itself."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.local_host, self._wanted_port, limit=READ_LIMIT)
        return self

    @property
    def local_port(self) -> int:
        """The local port it listens on (the one the system picked when asked for 0)."""
        if self._server is None or not self._server.sockets:
            return self._wanted_port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def local_address(self) -> str:
        """`host:port` it listens on, e.g. `127.0.0.1:8080` (`[::1]:8080` for IPv6)."""
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"{host}:{self.local_port}"

    @property
    def connections(self) -> int:
        """How many forwarded connections are open now."""
        return len(self._connections)

    @property
    def last_error(self) -> SandboxError | None:
        """The error of the newest connection that failed, if any (`errors` keeps the last 32)."""
        return self.errors[-1] if self.errors else None

    async def close(self) -> None:
        """Stops listening and ends the connections still open (their calls are cancelled). A second close is a
        no-op."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> AsyncPortForward:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncPortForward {self.local_address} -> {self.sandbox}:{self.guest_port}>"

    # --- one connection -------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closed or task is None:
            _reset(writer)
            return
        self._connections.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:  # close(): what the local side has not read yet is dropped
            writer.transport.abort()  # and the task must not end cancelled (asyncio 3.11 logs that as an error)
        finally:
            self._connections.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        call = self._stub.ForwardPort(metadata=self._client.metadata)
        sending = asyncio.create_task(self._send(reader, call), name="port-forward-send")
        receiving = asyncio.create_task(self._receive(call, writer), name="port-forward-receive")
        try:
            await asyncio.wait({receiving})  # a failed local side cancels the call, and with it `receiving`
        finally:
            call.cancel()  # nothing when it ended
            sending.cancel()
            receiving.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)
        failure = None if receiving.cancelled() else receiving.exception()
        if failure is not None:
            self._failed(failure)  # first: whoever sees the reset finds the error kept
            _reset(writer)
            return
        writer.close()  # after what the guest's server sent: the local client reads it all, then EOF
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _send(self, reader: asyncio.StreamReader, call: Any) -> None:
        """The local side's bytes, then `close_write` at its EOF. A call that ended is left to `_receive` to
        report; a local side that failed cancels the call."""
        try:
            await call.write(api.ForwardPortRequest(target=api.PortTarget(sandbox=self.sandbox, port=self.guest_port)))
            while data := await reader.read(CHUNK):
                await call.write(api.ForwardPortRequest(data=data))
            await call.write(api.ForwardPortRequest(close_write=api.CloseWrite()))
            await call.done_writing()
        except OSError as error:
            log.debug("port forward %s: local connection failed: %s", self.local_address, error)
            call.cancel()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass

    async def _receive(self, call: Any, writer: asyncio.StreamWriter) -> None:
        """The guest's bytes onto the local connection, each message only once the previous one drained, until the
        call ends (the guest's server closed its side)."""
        try:
            message = await asyncio.wait_for(call.read(), self._client.timeout)
        except TimeoutError:  # asyncio's, the builtin since 3.11
            raise DeadlineExceededError(
                f"port {self.guest_port} of {self.sandbox} did not connect within {self._client.timeout:g}s",
                code="DEADLINE_EXCEEDED",
            ) from None
        while message is not grpc.aio.EOF:
            if message.data:
                writer.write(message.data)
                await writer.drain()
            message = await call.read()
        if writer.can_write_eof():
            writer.write_eof()

    def _failed(self, failure: BaseException) -> None:
        if isinstance(failure, grpc.aio.AioRpcError):
            failure = from_rpc_error(failure)
        if not isinstance(failure, SandboxError):  # the local side: its client went away
            log.debug("port forward %s: local connection ended: %r", self.local_address, failure)
            return
        self.errors.append(failure)
        level = logging.DEBUG if self._on_error is not None else logging.WARNING
        log.log(level, "port forward %s -> %s:%d: %s", self.local_address, self.sandbox, self.guest_port, failure)
        if self._on_error is not None:
            try:
                self._on_error(failure)
            except Exception:
                log.exception("port forward %s: on_error raised", self.local_address)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes a local connection with a TCP reset, so its client sees a failure rather than an empty answer."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Starting:
    """What `AsyncSandbox.forward_port()` returns: await it, or use it with `async with` (closed on exit)."""

    def __init__(self, forward: AsyncPortForward) -> None:
        self._forward = forward

    def __await__(self) -> Generator[Any, None, AsyncPortForward]:
        return self._forward.start().__await__()

    async def __aenter__(self) -> AsyncPortForward:
        return await self._forward.start()

    async def __aexit__(self, *exc: object) -> None:
        await self._forward.close()


class AsyncPortForwardMethods:
    """`AsyncSandbox`'s `forward_port` (the sandbox provides `name` and `client`)."""

    if TYPE_CHECKING:  # what the sandbox provides

        @property
        def name(self) -> str: ...

    client: AsyncClient

    def forward_port(
        self,
        guest_port: int,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        on_error: ErrorCallback | None = None,
    ) -> _Starting:
        """Listens on local_host:local_port (0: a free port) and forwards each connection to `guest_port` on the
        sandbox's loopback, so servers bound to the guest's 127.0.0.1 are reachable and the guest needs no
        network. Await it for an `AsyncPortForward` (`local_port`, `local_address`, `close()`), or `async with`
        it to close it at the end. A connection that fails (e.g. nothing listens: FailedPreconditionError, reason
        PORT_NOT_LISTENING) is reset; its error goes to `errors` and `on_error`."""
        return _Starting(AsyncPortForward(self.client, self.name, guest_port, local_port, local_host, on_error))


__all__ = ["AsyncPortForward", "AsyncPortForwardMethods", "ErrorCallback"]
