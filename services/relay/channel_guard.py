"""What a guest may cost the relay: every channel's work is bounded, and a guest that breaks the protocol loses
its channel, never its neighbours' service.

- Junk: frames for streams nobody has open, malformed frames and unexpected ones count against a budget per
  window; over it, the channel is a protocol violation. Cancels for stale streams go out through one task per
  channel, for a bounded number of ids, never a task per frame.
- Memory: data a stream's caller has not taken yet is bounded per stream and per channel (the agent must send
  within the credit the relay grants; more is a violation).
- Liveness: a frame the guest began must be complete within `frame_seconds`; a quiet channel is pinged every
  `heartbeat_seconds` and closed when no answer comes within `heartbeat_timeout_seconds` (its streams end
  UNAVAILABLE and the next call reconnects).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelLimits:
    junk_frames: int = 1000
    junk_window_seconds: float = 10.0
    stream_buffer_bytes: int = 8 << 20
    channel_buffer_bytes: int = 64 << 20
    frame_seconds: float = 10.0
    heartbeat_seconds: float = 20.0
    heartbeat_timeout_seconds: float = 30.0
    stale_cancels: int = 256


class ProtocolViolation(Exception):
    """The guest broke the protocol; the message says how (it becomes the sandbox's failure reason)."""


class JunkMeter:
    """Counts frames that serve no stream in a sliding window; raises ProtocolViolation past the budget."""

    def __init__(self, limits: ChannelLimits) -> None:
        self.limits = limits
        self._times: deque[float] = deque()
        self.total = 0

    def count(self, what: str) -> None:
        now = time.monotonic()
        self._times.append(now)
        self.total += 1
        while self._times and self._times[0] < now - self.limits.junk_window_seconds:
            self._times.popleft()
        if len(self._times) > self.limits.junk_frames:
            raise ProtocolViolation(
                f"more than {self.limits.junk_frames} frames in "
                f"{self.limits.junk_window_seconds:.0f} s served no stream (last: {what})"
            )


def data_size(frame) -> int:
    """Bytes of payload a frame carries towards a stream's caller."""
    kind = frame.WhichOneof("body")
    if kind == "output":
        return len(frame.output.data)
    if kind == "file_data":
        return len(frame.file_data.data)
    if kind == "watch_events":  # sent within credit like file data, counted by size
        return frame.watch_events.ByteSize()
    return 0
