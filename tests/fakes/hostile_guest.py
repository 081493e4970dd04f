"""A guest agent that misbehaves on purpose, on a unix socket the relay connects to as to any guest's channel.

It says Hello and answers pings like the real agent, then does what `mode` says:
- `unknown-ids`: floods output frames for streams that were never opened;
- `malformed`: floods frames whose bodies are not protobuf;
- `oversize`: announces a frame far beyond the maximum;
- `half-frame`: sends the first half of a 2 MiB frame and then nothing at all (pings unanswered too);
- `restart`: answers an exec with `exec_started`, then says Hello again (an agent that restarted);
- `overflow`: answers an exec with output far beyond the credit it was granted;
- `silent`: answers pings (with the right time) until a call starts, then never again;
- `watch-flood`: answers a directory watch with changes far beyond the credit it was granted;
- `stale-tail`: not hostile, unlucky: before its Hello come the last bytes of a frame cut by a snapshot (a pong
  whose header went to the connection before the restore), then it behaves;
- `no-frames`: sends bytes that never hold a whole frame, and nothing else;
- `gone-after-identity`: not hostile: takes its identity and then its VM is gone (the channel closes).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from microvm.agent.v1 import agent_pb2
from microvm_agent.framing import HEADER, FrameDecoder, encode


class HostileGuest:
    def __init__(self, path: str, mode: str) -> None:
        self.path, self.mode = path, mode
        self.server: asyncio.AbstractServer | None = None
        self.frames_sent = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> HostileGuest:
        self.server = await asyncio.start_unix_server(self._connected, self.path)
        return self

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "stale-tail":
            cut = encode(agent_pb2.Frame(stream_id=0, pong=agent_pb2.Pong(nonce=7, boot_id="b" * 32, hostname="h")))
            writer.write(cut[4:])  # its body, read as a header, announces a frame of hundreds of MB
        elif self.mode == "no-frames":
            task = asyncio.get_running_loop().create_task(self._garbage(writer))
            self.tasks.add(task)
            return
        writer.write(
            encode(
                agent_pb2.Frame(
                    stream_id=0,
                    hello=agent_pb2.Hello(
                        protocol_version=1, boot_id=os.urandom(8).hex(), hostname="hostile", initial_window=1 << 20
                    ),
                )
            )
        )
        await writer.drain()
        if self.mode == "half-frame":  # begins a frame at once and never finishes it, nor answers anything
            self._misbehave(writer)
        pongs = 0
        silenced = False
        decoder = FrameDecoder()
        while data := await reader.read(1 << 16):
            for body in decoder.feed(data):
                frame = agent_pb2.Frame.FromString(body)
                kind = frame.WhichOneof("body")
                if kind == "ping":
                    pongs += 1
                    if self.mode == "half-frame" or silenced:
                        continue
                    pong = agent_pb2.Pong(nonce=frame.ping.nonce, unix_time_ns=time.time_ns())
                    writer.write(encode(agent_pb2.Frame(stream_id=0, pong=pong)))
                    await writer.drain()
                    if pongs == 1:
                        self._misbehave(writer)
                elif kind == "set_identity" and self.mode == "mute-after-identity":
                    silenced = True  # takes its identity, then never answers again
                elif kind == "set_identity" and self.mode == "gone-after-identity":
                    writer.close()  # as a VMM that exits closes its end of the channel
                    return
                elif kind == "watch_start" and self.mode == "watch-flood":
                    await self._flood_watch(frame.stream_id, writer)
                elif kind == "exec_start":
                    if self.mode == "silent":
                        silenced = True
                    await self._answer_exec(frame.stream_id, writer)

    def _misbehave(self, writer: asyncio.StreamWriter) -> None:
        if self.mode in ("unknown-ids", "malformed"):
            task = asyncio.get_running_loop().create_task(self._flood(writer))
            self.tasks.add(task)
        elif self.mode == "oversize":
            writer.write(HEADER.pack(100 << 20) + b"x" * 1024)
        elif self.mode == "half-frame":
            writer.write(HEADER.pack(2 << 20) + b"\x08" * (1 << 20))

    async def _garbage(self, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(b"\xff" * (1 << 20))
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(0)

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        while True:
            batch = []
            for _ in range(256):
                if self.mode == "malformed":
                    body = os.urandom(64)
                    batch.append(HEADER.pack(len(body)) + body)
                else:
                    batch.append(
                        encode(
                            agent_pb2.Frame(
                                stream_id=random.getrandbits(62) | 1,
                                output=agent_pb2.Output(channel=agent_pb2.OUTPUT_CHANNEL_STDOUT, data=b"junk" * 16),
                            )
                        )
                    )
            writer.write(b"".join(batch))
            self.frames_sent += len(batch)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(0)

    async def _flood_watch(self, stream_id: int, writer: asyncio.StreamWriter) -> None:
        writer.write(
            encode(agent_pb2.Frame(stream_id=stream_id, watch_events=agent_pb2.WatchEvents(started_directories=1)))
        )
        change = agent_pb2.WatchEvent(type=agent_pb2.WATCH_EVENT_TYPE_CREATE, path="/" + "w" * 4000)
        batch = encode(agent_pb2.Frame(stream_id=stream_id, watch_events=agent_pb2.WatchEvents(events=[change] * 250)))
        for _ in range(64):  # ~64 MiB of changes against 1 MiB of credit
            writer.write(batch)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _answer_exec(self, stream_id: int, writer: asyncio.StreamWriter) -> None:
        writer.write(encode(agent_pb2.Frame(stream_id=stream_id, exec_started=agent_pb2.ExecStarted(pid=4242))))
        if self.mode == "restart":
            writer.write(
                encode(
                    agent_pb2.Frame(
                        stream_id=0,
                        hello=agent_pb2.Hello(
                            protocol_version=1, boot_id=os.urandom(8).hex(), hostname="hostile", initial_window=1 << 20
                        ),
                    )
                )
            )
        elif self.mode == "overflow":
            chunk = encode(
                agent_pb2.Frame(
                    stream_id=stream_id,
                    output=agent_pb2.Output(channel=agent_pb2.OUTPUT_CHANNEL_STDOUT, data=b"o" * (1 << 20)),
                )
            )
            for _ in range(64):
                writer.write(chunk)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass
