"""A `javascript` context: one persistent Node.js process per context running node_driver.js (what it supports:
that file's header). Runs reach the driver on a pipe of their own (its stdin is /dev/null), so code reading stdin
cannot take them; its stdout and stderr are the code's output, as for bash."""

import asyncio
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from context_base import error_event
from process_context import ProcessContext

NODE = shutil.which("node") or shutil.which("nodejs") or "/usr/bin/node"
DRIVER = Path(__file__).with_name("node_driver.js")


def node_available() -> bool:
    return os.access(NODE, os.X_OK) and DRIVER.is_file()


@dataclass
class NodeContext(ProcessContext):
    kind_name: str = "Node.js process"
    requests: asyncio.WriteTransport | None = None

    async def spawn(self) -> asyncio.subprocess.Process:
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                NODE,
                "--expose-internals",  # the REPL's top-level await rewriting (node_driver.js)
                str(DRIVER),
                str(read_fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(read_fd,),
                cwd=self.cwd,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        pipe = os.fdopen(write_fd, "wb", buffering=0)
        self.requests, _ = await asyncio.get_running_loop().connect_write_pipe(asyncio.BaseProtocol, pipe)
        return process

    async def stop(self) -> None:
        if self.requests is not None:
            with contextlib.suppress(Exception):
                self.requests.close()
            self.requests = None
        await super().stop()

    async def send_run(self, code: str, marker: str, env: dict[str, str]) -> None:
        # one request at a time and at most a request's size: the transport's buffer needs no flow control
        self.requests.write(json.dumps({"code": code, "marker": marker, "env": env}).encode() + b"\n")

    def finish(self, trailer: str, timed_out: bool) -> tuple[str, list[dict]]:
        try:
            finished = json.loads(trailer)
            status, events = finished["status"], list(finished["events"])
        except (ValueError, KeyError, TypeError) as error:
            return "error", [error_event("DriverError", f"unreadable end of run from node_driver.js: {error}")]
        if timed_out:
            events = [event for event in events if event.get("name") != "Interrupted"]  # the TimeoutError said it
        return ("error" if status == "error" else "ok"), events
