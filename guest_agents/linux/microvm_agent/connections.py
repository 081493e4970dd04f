"""connect_start: a byte stream between the host and a socket in the guest (the code server's unix socket, a
forwarded TCP port), so the host reaches guest services without any guest networking.

Both directions are flow-controlled: what the socket gives goes out within the credit the host grants; what the
host sends is written to the socket before the agent grants the host more. Either side's eof half-closes that
direction; the stream ends when the guest side has nothing more to say (its eof sent) or on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from microvm.agent.v1 import agent_pb2
from microvm_agent import files
from microvm_agent.files import TRANSFER_AHEAD, require_absolute
from microvm_agent.streams import FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, OUTPUT_CHUNK, Credit, StreamError

if TYPE_CHECKING:
    from microvm_agent.agent import Agent

MAX_UNIX_PATH = 107
UNAVAILABLE = 14
# Host simulation only (the fake VMM of tests, `--root`): a regular file starting with this line stands in for a
# socket and names the host socket to reach instead (a guest's disk copy cannot hold a socket or a link out of it).
SIMULATED_SOCKET = "mvm-simulated-socket:"


async def open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connects to the unix socket at `path`; a path longer than a socket address holds (a host simulation's deep
    root) is reached through its directory's descriptor."""
    path = _simulated(path)
    if len(path.encode()) <= MAX_UNIX_PATH:
        return await asyncio.open_unix_connection(path, limit=OUTPUT_CHUNK)
    directory = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return await asyncio.open_unix_connection(
            f"/proc/self/fd/{directory}/{os.path.basename(path)}", limit=OUTPUT_CHUNK
        )
    finally:
        os.close(directory)


def _simulated(path: str) -> str:
    if not files.PATH_ROOT or not os.path.isfile(path):
        return path
    with open(path, encoding="utf-8", errors="replace") as stand_in:
        line = stand_in.readline(4096).strip()
    return line[len(SIMULATED_SOCKET) :] if line.startswith(SIMULATED_SOCKET) else path


class GuestConnection:
    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id
        self.incoming: asyncio.Queue[agent_pb2.FileData] = asyncio.Queue()
        self.credit = Credit(agent.initial_window)

    def handle(self, frame: agent_pb2.Frame) -> None:
        kind = frame.WhichOneof("body")
        if kind == "file_data":
            self.incoming.put_nowait(frame.file_data)
        elif kind == "window_update":
            self.credit.grant(frame.window_update.increment)

    async def _connect(self, start: agent_pb2.ConnectStart):
        target = start.WhichOneof("target")
        if target == "unix_path":
            path, where = require_absolute(start.unix_path), start.unix_path
            opening = open_unix(path)
        elif target == "tcp_port":
            if not 0 < start.tcp_port < 65536:
                raise StreamError(INVALID_ARGUMENT, f"tcp_port must be 1..65535, got {start.tcp_port}")
            where = f"127.0.0.1:{start.tcp_port}"
            opening = asyncio.open_connection("127.0.0.1", start.tcp_port, limit=OUTPUT_CHUNK)
        else:
            raise StreamError(INVALID_ARGUMENT, "connect_start names no target (unix_path or tcp_port)")
        try:
            return await opening
        except FileNotFoundError:
            raise StreamError(NOT_FOUND, f"nothing listens at {where} (no such socket)", "SOCKET_NOT_FOUND") from None
        except ConnectionRefusedError:
            refused = f"nothing listens at {where} (connection refused)"
            raise StreamError(UNAVAILABLE, refused, "CONNECTION_REFUSED") from None
        except OSError as exc:
            raise StreamError(FAILED_PRECONDITION, f"cannot connect to {where}: {exc.strerror or exc}") from None

    async def run(self, start: agent_pb2.ConnectStart) -> None:
        reader, writer = await self._connect(start)
        self.agent.send(self.stream_id, connected=agent_pb2.Connected())
        self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=TRANSFER_AHEAD))
        upstream = asyncio.ensure_future(self._to_socket(writer))
        try:
            await self._from_socket(reader)
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upstream
            writer.close()

    async def _to_socket(self, writer: asyncio.StreamWriter) -> None:
        """The host's bytes into the socket; credit goes back only once they are written (back-pressure)."""
        while True:
            chunk = await self.incoming.get()
            if chunk.data:
                writer.write(chunk.data)
                await writer.drain()
                self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=len(chunk.data)))
            if chunk.eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return

    async def _from_socket(self, reader: asyncio.StreamReader) -> None:
        while True:
            allowed = await self.credit.take(OUTPUT_CHUNK)
            try:
                data = await reader.read(allowed)
            except ConnectionResetError:
                data = b""  # the guest side went away: for the host that is its end
            if not data:
                self.credit.grant(allowed)
                self.agent.send(self.stream_id, file_data=agent_pb2.FileData(eof=True))
                return
            self.credit.grant(allowed - len(data))
            self.agent.send(self.stream_id, file_data=agent_pb2.FileData(data=data))


FILE_STREAMS = {"connect_start": GuestConnection}
