"""Finding the first whole frame of a new connection to an agent, after whatever stale bytes came before it.

A guest snapshotted while its agent was writing a frame keeps the rest of that frame in the channel's queue; after a
restore the next connection gets that tail first (CI saw a pong split across a snapshot: its body was read as a
header announcing 576 MB). A new connection's first frames from the agent are its Hello (when it noticed the
reconnect) and the Pongs to the pings the relay sends until one is answered, so until one of those is found the
bytes before it are stale and are dropped; after it, framing is exact. A connection that shows neither within a
bound is a guest breaking the protocol.
"""

from __future__ import annotations

from microvm.agent.v1 import agent_pb2
from microvm_agent.framing import HEADER, MAX_FRAME_BYTES

MAX_STALE_BYTES = 2 * MAX_FRAME_BYTES
MAX_SYNC_FRAME_BYTES = 4096  # a Hello or a Pong is far smaller


def sync_frame_at(buffer: bytes | bytearray, offset: int) -> bool:
    """True when a whole Hello or Pong frame (on stream 0) starts at `offset`."""
    if len(buffer) - offset < HEADER.size:
        return False
    (length,) = HEADER.unpack_from(buffer, offset)
    if not 0 < length <= MAX_SYNC_FRAME_BYTES or len(buffer) - offset - HEADER.size < length:
        return False
    try:
        frame = agent_pb2.Frame.FromString(bytes(buffer[offset + HEADER.size : offset + HEADER.size + length]))
    except Exception:
        return False
    kind = frame.WhichOneof("body")
    return frame.stream_id == 0 and (kind == "pong" or (kind == "hello" and bool(frame.hello.boot_id)))


class FrameSeeker:
    """Takes the bytes of a new connection until its first Hello or Pong; then hands back that frame and what
    follows it."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> bytes | None:
        """None while still seeking; once found, the bytes from the frame's first on (to decode as frames). Raises
        ValueError when more than MAX_STALE_BYTES came without one."""
        self._buffer += data
        # A sync frame's length is under 64 KiB, so its header starts with two zero bytes: only those places are
        # tried (found in C, not byte by byte in Python).
        offset = self._buffer.find(b"\x00\x00")
        while offset >= 0:
            if sync_frame_at(self._buffer, offset):
                self.dropped += offset
                return bytes(self._buffer[offset:])
            offset = self._buffer.find(b"\x00\x00", offset + 1)
        # Keep what may still be the start of a frame whose rest has not arrived.
        keep = min(len(self._buffer), MAX_SYNC_FRAME_BYTES + HEADER.size)
        self.dropped += len(self._buffer) - keep
        del self._buffer[: len(self._buffer) - keep]
        if self.dropped > MAX_STALE_BYTES:
            raise ValueError(f"{self.dropped} bytes came before the agent's hello or an answer to a ping")
        return None
