"""Our process events (`ExecResponse`) as E2B's (`process.ProcessEvent`).

E2B's envd reports the end of a process as Go's os.ProcessState does: `exit status N` with `exited` and the code,
or `signal: killed` with `exited` false and exit code -1; `error` is what Go's cmd.Wait() returned (the same
words) for anything but a zero exit. The SDK raises CommandExitException for a code other
than 0, so a killed command is an error there as it is in E2B.
"""

from __future__ import annotations

import signal as signals

from e2b_envd import process_pb2 as e2b

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b.connect_protocol import ConnectError

# A command killed because the call's `timeout` passed ends its stream with the SDK's TimeoutException, as with
# envd (whose stream's deadline passes at the moment it kills the process), not with an exit.
TIMED_OUT = ConnectError("deadline_exceeded", "the command's timeout passed: it was killed")

# Go's names for the signals a command usually ends by (os.ProcessState.String).
SIGNAL_NAMES = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup", 6: "aborted", 11: "segmentation fault"}


def end_event(exited: api.ProcessExited) -> e2b.ProcessEvent:
    if exited.WhichOneof("status") == "signal":
        name = SIGNAL_NAMES.get(exited.signal) or _signal_name(exited.signal)
        status = f"signal: {name}"
        end = e2b.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
    else:
        status = f"exit status {exited.exit_code}"
        end = e2b.ProcessEvent.EndEvent(exit_code=exited.exit_code, exited=True, status=status)
        if exited.exit_code:  # envd's error is Go's cmd.Wait() error, which a non-zero exit is
            end.error = status
    return e2b.ProcessEvent(end=end)


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name.lower()
    except ValueError:
        return f"signal {number}"


def process_event(event: api.ExecResponse) -> e2b.ProcessEvent | None:
    """The E2B event for one of ours (a `started` is answered by the caller, who knows the pid first)."""
    which = event.WhichOneof("event")
    if which == "stdout":
        return e2b.ProcessEvent(data=e2b.ProcessEvent.DataEvent(stdout=event.stdout))
    if which == "stderr":
        return e2b.ProcessEvent(data=e2b.ProcessEvent.DataEvent(stderr=event.stderr))
    if which == "keepalive":
        return e2b.ProcessEvent(keepalive=e2b.ProcessEvent.KeepAlive())
    if which == "exited":
        return end_event(event.exited)
    return None
