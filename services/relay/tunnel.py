"""GuestTunnel: a byte stream to a socket inside a guest over its agent channel (agent frame connect_start), with
flow control both ways. The code server's calls ride on it; so can any forwarded port.

Reading grants the agent credit only as the reader takes bytes, so a slow consumer slows the guest socket, never
grows a buffer here; writing waits for the credit the agent grants as it writes into the socket.
"""

from __future__ import annotations

import asyncio

from microvm.agent.v1 import agent_pb2
from services.relay.agent_channel import AgentStream
from services.relay.guest_io import failure

DEFAULT_WINDOW = 1 << 20
MAX_FRAME_DATA = 1 << 20


class GuestTunnel:
    def __init__(self, stream: AgentStream) -> None:
        self.stream = stream
        hello = stream.channel.hello
        self._credit = hello.initial_window if hello and hello.initial_window else DEFAULT_WINDOW
        self._granted = asyncio.Event()
        self._incoming: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self._pump: asyncio.Task | None = None
        self._buffer = bytearray()
        self.ended = False  # the guest side sent its eof or failed: the agent stream is over
        self.closed = False

    @classmethod
    async def open(cls, stream: AgentStream, *, unix_path: str = "", tcp_port: int = 0) -> GuestTunnel:
        """Connects; raises the guest's status (NOT_FOUND reason SOCKET_NOT_FOUND when nothing listens there)."""
        tunnel = cls(stream)
        target = agent_pb2.ConnectStart(unix_path=unix_path) if unix_path else agent_pb2.ConnectStart(tcp_port=tcp_port)
        try:
            await stream.send(connect_start=target)
            while True:
                frame = await stream.receive()
                kind = frame.WhichOneof("body")
                if kind == "connected":
                    break
                if kind == "error":
                    tunnel.ended = True
                    raise failure(frame)
        except BaseException:
            await tunnel.close()
            raise
        tunnel._pump = asyncio.create_task(tunnel._receive_forever(), name=f"tunnel-{stream.stream_id}")
        return tunnel

    async def _receive_forever(self) -> None:
        try:
            while True:
                frame = await self.stream.receive()
                kind = frame.WhichOneof("body")
                if kind == "window_update":
                    self._credit += frame.window_update.increment
                    self._granted.set()
                elif kind == "file_data":
                    if frame.file_data.data:
                        self._incoming.put_nowait(frame.file_data.data)
                    if frame.file_data.eof:
                        self.ended = True
                        self._incoming.put_nowait(b"")
                        return
                elif kind == "error":
                    self.ended = True
                    self._incoming.put_nowait(failure(frame))
                    return
        except Exception as exc:  # the channel died
            self.ended = True
            self._incoming.put_nowait(exc)
        finally:
            self._granted.set()  # a writer waiting for credit learns the tunnel is over

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0 and not self.ended:
                self._granted.clear()
                await self._granted.wait()
            if self.ended:
                raise BrokenPipeError("the guest side of the tunnel is closed")
            size = min(len(view), self._credit, MAX_FRAME_DATA)
            self._credit -= size
            await self.stream.send(file_data=agent_pb2.FileData(data=bytes(view[:size])))
            view = view[size:]

    async def write_eof(self) -> None:
        if not self.ended:
            await self.stream.send(file_data=agent_pb2.FileData(eof=True))

    async def _fill(self) -> bool:
        """Moves the next bytes from the guest into the buffer; False at the end. Cancelled, it loses nothing (the
        bytes are buffered before the credit for them goes out)."""
        item = await self._incoming.get()
        if isinstance(item, Exception):
            self._incoming.put_nowait(item)  # every later read fails the same way
            raise item
        if not item:
            self._incoming.put_nowait(b"")
            return False
        self._buffer += item
        await self.stream.grant(len(item))
        return True

    async def read(self) -> bytes:
        """The next bytes from the guest side; b"" once it has ended. Raises the guest's status on failure."""
        if not self._buffer and not await self._fill():
            return b""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    async def readline(self, limit: int) -> bytes:
        """One line with its newline (or what came before the end); ValueError past `limit` bytes. Safe to cancel
        (a timeout around it): a partial line stays buffered for the next call."""
        while True:
            cut = self._buffer.find(b"\n")
            if cut >= 0:
                line = bytes(self._buffer[: cut + 1])
                del self._buffer[: cut + 1]
                return line
            if len(self._buffer) > limit:
                raise ValueError(f"a line longer than {limit} bytes")
            if not await self._fill():
                line, self._buffer = bytes(self._buffer), bytearray()
                return line

    @property
    def buffered(self) -> bool:
        """Bytes arrived that nobody has read yet."""
        return bool(self._buffer) or not self._incoming.empty()

    async def close(self) -> None:
        """Ends the tunnel; the agent closes its socket (cancelled unless the guest side already ended)."""
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.cancel()
        await self.stream.close(cancel=not self.ended)
