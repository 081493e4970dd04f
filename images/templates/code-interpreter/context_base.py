"""What every kind of context shares: the refusal, the per-run env check, the events a run yields (see
mvm_code_server's protocol) and the output bound of one run. Runs on Debian bookworm's python3 (3.11)."""

import asyncio
import json
import re
from dataclasses import dataclass, field

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_ENV_ENTRIES = 256
INTERRUPT_GRACE_SECONDS = 5.0  # after a timeout's interrupt, how long the code has to stop


class Refused(Exception):
    """A request refused before anything ran; `name` is the protocol's error name."""

    def __init__(self, name: str, value: str, **extra):
        super().__init__(value)
        self.name, self.value, self.extra = name, value, extra


def checked_env(env) -> dict[str, str]:
    """`env` of a request as a dict, or Refused: names are non-empty strings without "=" or NUL, values strings
    without NUL, at most MAX_ENV_ENTRIES of them."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise Refused("bad_request", "env must be an object mapping names to strings")
    if len(env) > MAX_ENV_ENTRIES:
        raise Refused("bad_request", f"env has {len(env)} entries; at most {MAX_ENV_ENTRIES}")
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise Refused("bad_request", f"env name {name!r} is empty or holds '=' or NUL")
        if not isinstance(value, str) or "\0" in value:
            raise Refused("bad_request", f"env value of {name!r} must be a string without NUL")
    return dict(env)


def error_event(name: str, value: str, traceback=()) -> dict:
    return {"type": "error", "name": name, "value": value, "traceback": [ANSI.sub("", line) for line in traceback]}


def timeout_event(timeout: float) -> dict:
    return error_event(
        "TimeoutError",
        f"the code ran past its timeout of {timeout:g} s and was interrupted; the context keeps its state",
    )


def end_event(execution_count, status: str, restarted: bool, output: "OutputBound") -> dict:
    end = {"type": "end", "execution_count": execution_count, "status": status}
    if restarted:
        end["restarted"] = True
    if output.truncated:
        end["truncated"] = True
    return end


class OutputBound:
    """What one run may send: stdout, stderr and results together, in bytes of their JSON text. A stream that
    crosses the bound is cut at it; a result that does not fit is dropped; then everything is dropped."""

    def __init__(self, limit: int):
        self.left = limit
        self.truncated = False

    def admit(self, event: dict) -> bool:
        if self.truncated:
            return False
        if event["type"] in ("stdout", "stderr"):
            text = event["text"]
            size = len(text.encode())
            if size > self.left:
                event["text"] = text.encode()[: self.left].decode(errors="ignore")
                self.truncated, self.left = True, 0
                return bool(event["text"])
        else:
            size = len(json.dumps(event))
            if size > self.left:
                self.truncated, self.left = True, 0
                return False
        self.left -= size
        return True


@dataclass
class Context:
    """A context: its id, language, working directory and environment, and the lock a run holds. Kinds implement
    start, stop, interrupt and run(code, timeout, max_output_bytes, env) (an async generator of events, the last one
    `end`); check_env refuses a per-run env the kind cannot set."""

    id: str
    language: str
    cwd: str
    env: dict[str, str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd, "env": self.env}

    def check_env(self, env: dict[str, str]) -> None:
        pass

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def interrupt(self) -> None:
        raise NotImplementedError

    async def warm(self) -> None:
        """Exercises the run path without leaving a trace (Python kernels; others have nothing to warm)."""
