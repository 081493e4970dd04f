"""Runs inside each Python kernel (loaded once at kernel start by mvm_code_server, like kernel_display.py): two cuts
in ipykernel's per-cell message path. Measured in a guest under QEMU TCG (bookworm's ipykernel 6.17), a `1+1` cell
took 70 ms from execute_request to the idle status through jupyter_client; with both, 51 ms.

- No `execute_input` on IOPub. ipykernel re-broadcasts every cell's code for other frontends watching the kernel;
  the code server is the kernel's only client, knows the code it sent, and takes the execution count from the
  execute_reply. One message fewer to serialize, hand to the IOPub thread and parse.
- `flush()` of stdout or stderr with nothing buffered returns at once. ipykernel flushes both streams around each
  cell's display hook and before its reply, and each flush is a round trip through the IOPub thread (schedule the
  flush, schedule an event, wait for it): four per cell, ~2 ms each here. With nothing buffered there is nothing to
  send, and ordering still holds: whatever an earlier flush took from the buffer is sent by the IOPub thread before
  anything queued behind it. A stream with anything buffered, a flush pending or an echo flushes as before.

Each cut is installed only where ipykernel's internals are the ones it was written against (6.x: one `_buffer`;
7.x: a `_buffers` dict per parent); elsewhere the kernel keeps its own behaviour.
"""

import sys


def install(shell) -> list[str]:
    """Installs both cuts on the kernel behind an IPython shell (`get_ipython()`); returns the names of those
    installed."""
    installed = []
    kernel = getattr(shell, "kernel", None)
    if kernel is not None and callable(getattr(kernel, "_publish_execute_input", None)):
        kernel._publish_execute_input = _no_execute_input
        installed.append("no_execute_input")
    stream_class = type(sys.stdout)
    if _knows_buffers(sys.stdout) and _knows_buffers(sys.stderr) and type(sys.stderr) is stream_class:
        if not getattr(stream_class.flush, "mvm_empty_flush_returns", False):
            stream_class.flush = _empty_flush_returns(stream_class.flush)
        installed.append("empty_flush_returns")
    return installed


def _no_execute_input(code, parent, execution_count):
    """In place of Kernel._publish_execute_input."""


def _knows_buffers(stream) -> bool:
    return (
        type(stream).__module__ == "ipykernel.iostream"
        and hasattr(stream, "_buffer_lock")
        and hasattr(stream, "_flush_pending")
        and (hasattr(stream, "_buffers") or hasattr(stream, "_buffer"))
    )


def _nothing_to_flush(stream) -> bool:
    if stream._flush_pending or getattr(stream, "_subprocess_flush_pending", False) or stream.echo is not None:
        return False
    with stream._buffer_lock:
        buffers = stream._buffers.values() if hasattr(stream, "_buffers") else [stream._buffer]
        return all(buffer.tell() == 0 for buffer in buffers)


def _empty_flush_returns(flush):
    def empty_flush_returns(self):
        if _nothing_to_flush(self):
            return None
        return flush(self)

    empty_flush_returns.mvm_empty_flush_returns = True
    empty_flush_returns.__doc__ = flush.__doc__
    return empty_flush_returns
