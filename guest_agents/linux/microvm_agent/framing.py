"""Length-prefixed agent.v1 frames: 4-byte big-endian length, then the serialized Frame."""

from __future__ import annotations

import struct

from microvm.agent.v1 import agent_pb2

MAX_FRAME_BYTES = 2 << 20
HEADER = struct.Struct(">I")


class FrameTooLarge(Exception):
    pass


def encode(frame: agent_pb2.Frame) -> bytes:
    body = frame.SerializeToString()
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def encode_parts(frame: agent_pb2.Frame) -> tuple[bytes, bytes]:
    """Header and body separately, for writev without joining them."""
    body = frame.SerializeToString()
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)), body


class FrameDecoder:
    """Accumulates bytes and yields complete frame bodies; never buffers more than one max frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        bodies = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                self._buffer.clear()
                raise FrameTooLarge(f"announced frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            if len(self._buffer) < HEADER.size + length:
                break
            bodies.append(bytes(self._buffer[HEADER.size : HEADER.size + length]))
            del self._buffer[: HEADER.size + length]
        return bodies

    @property
    def pending(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return bool(self._buffer)

    def reset(self) -> None:
        self._buffer.clear()
