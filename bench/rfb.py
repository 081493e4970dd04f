"""A minimal VNC (RFB 3.3/3.7/3.8) client that measures full frames per second: handshake with security type None,
one encoding, then a loop of FramebufferUpdateRequest incremental=0 for the whole screen, one request in flight, as
a viewer does. Pixels are counted, never decoded. Encodings: `raw` (every frame is the whole framebuffer's bytes,
3 MiB at 1024x768x32, whatever the screen shows: the transport's figure) or `zrle` (zlib-compressed, what a
viewer such as noVNC asks for: mostly the server's encoding and the round trips).

Standard library only: bench/desktop.py runs it on the host over the gateway's WebSocket and over the SDK's port
forward, and copies this file into the guest to run it against x11vnc on the guest's loopback:

    python3 rfb.py HOST PORT SECONDS [raw|zrle]   # prints {"frames", "seconds", "bytes", "width", "height"}
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

ENCODINGS = {"raw": 0, "zrle": 16}


class TcpStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, count: int) -> bytes:
        return await self.reader.readexactly(count)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


class RfbSession:
    """One connection to a VNC server over a stream with `read(count)` (exactly count bytes) and `write(data)`."""

    def __init__(self, stream, encoding: str = "raw") -> None:
        self.stream, self.encoding = stream, ENCODINGS[encoding]
        self.width = self.height = self.bytes_per_pixel = 0

    async def handshake(self) -> None:
        banner = await self.stream.read(12)
        if not banner.startswith(b"RFB 003."):
            raise ConnectionError(f"not a VNC server: {banner!r}")
        minor = min(int(banner[8:11]), 8)
        await self.stream.write(b"RFB 003.%03d\n" % minor)
        if minor >= 7:
            types = await self.stream.read((await self.stream.read(1))[0])
            if not types:
                raise ConnectionError(await self._reason())
            if 1 not in types:
                raise ConnectionError(f"the server wants authentication (security types {list(types)})")
            await self.stream.write(b"\x01")
        elif struct.unpack(">I", await self.stream.read(4))[0] != 1:
            raise ConnectionError("the server wants authentication")
        if minor >= 8 and struct.unpack(">I", await self.stream.read(4))[0] != 0:
            raise ConnectionError(await self._reason())
        await self.stream.write(b"\x01")  # ClientInit: shared, as the live view's viewers are
        self.width, self.height = struct.unpack(">HH", await self.stream.read(4))
        self.bytes_per_pixel = (await self.stream.read(16))[0] // 8
        await self.stream.read(struct.unpack(">I", await self.stream.read(4))[0])  # the desktop's name
        await self.stream.write(struct.pack(">BBHi", 2, 0, 1, self.encoding))  # SetEncodings: this one only

    async def _reason(self) -> str:
        return (await self.stream.read(struct.unpack(">I", await self.stream.read(4))[0])).decode(errors="replace")

    async def full_frame(self) -> int:
        """Requests the whole screen (incremental=0) and reads the update; the bytes it carried."""
        await self.stream.write(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))
        while True:
            kind = (await self.stream.read(1))[0]
            if kind == 0:  # FramebufferUpdate
                return await self._update()
            if kind == 1:  # SetColourMapEntries
                await self.stream.read(6 * struct.unpack(">xHH", await self.stream.read(5))[1])
            elif kind == 3:  # ServerCutText
                await self.stream.read(struct.unpack(">3xI", await self.stream.read(7))[0])
            elif kind != 2:  # 2 is Bell, nothing follows
                raise ConnectionError(f"unexpected server message {kind}")

    async def _update(self) -> int:
        (rectangles,) = struct.unpack(">xH", await self.stream.read(3))
        total = 0
        for _ in range(rectangles):
            _x, _y, width, height, encoding = struct.unpack(">HHHHi", await self.stream.read(12))
            if encoding == 0:  # Raw, which a server may always send
                total += len(await self.stream.read(width * height * self.bytes_per_pixel))
            elif encoding == 16:  # ZRLE: a length, then that much zlib data
                total += len(await self.stream.read(struct.unpack(">I", await self.stream.read(4))[0])) + 4
            else:
                raise ConnectionError(f"asked for encoding {self.encoding}, got {encoding}")
        return total


async def frames_per_second(stream, seconds: float, encoding: str = "raw") -> dict:
    """Full frames for `seconds` after the handshake and a first frame (not counted)."""
    session = RfbSession(stream, encoding)
    await session.handshake()
    await session.full_frame()
    frames = carried = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        carried += await session.full_frame()
        frames += 1
    return {"frames": frames, "seconds": elapsed, "bytes": carried, "width": session.width, "height": session.height}


async def over_tcp(host: str, port: int, seconds: float, encoding: str = "raw") -> dict:
    stream = TcpStream(*await asyncio.open_connection(host, port))
    try:
        return await frames_per_second(stream, seconds, encoding)
    finally:
        await stream.close()


if __name__ == "__main__":
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(asyncio.run(over_tcp(host, port, seconds, sys.argv[4] if len(sys.argv) > 4 else "raw"))))
