"""The code server of the `code-interpreter` template: stateful Python (Jupyter), bash and JavaScript contexts
behind a unix socket.

    python3 mvm_code_server.py [--socket /run/mvm-code.sock] [--max-output-bytes 16777216] [--cwd /home/user]

It starts the `default` Python context first and only then listens, so a socket that exists means a warm kernel
(the template's ready check). Any number of clients at once; each connection sends requests and reads replies,
one JSON object per line each way, one request at a time per connection (use another connection to interrupt).

Requests (`op` names the operation):
    {"op": "run", "code": str, "context": id?, "language": "python"?, "timeout": seconds?, "env": {str: str}?}
        context: run there; else the default context of `language` (python: "default", started with the server;
        another language: "default-<language>", started on first use). timeout: default 300, null = none.
        env: set for this run only; afterwards the context's earlier values come back and new names are unset
        again, also when the code fails or times out. At most 256 names, none empty or holding "=" or NUL (bash:
        shell variable names); python and bash set them in the kernel or shell, javascript in process.env. Names
        whose value is the one the context was started with are left alone (no cost).
    {"op": "create_context", "language": "python"?, "cwd": str?, "env": {str: str}?}
    {"op": "list_contexts"}
    {"op": "restart_context", "context": id}      a fresh kernel, same language, cwd and env; state is lost
    {"op": "delete_context", "context": id}
    {"op": "interrupt", "context": id}            interrupts the code running there (its run ends "error")
    {"op": "warm"}        runs warm-up cells in the default Python context, leaving no trace (the ready check)

Languages (list_contexts says which are installed): "python" (an ipykernel kernel; any other Jupyter kernelspec
runs the same way under its language's name); "bash" (a persistent bash shell, see bash_context.py: variables,
functions and the working directory persist; a non-zero exit status of the last command is an error
"CommandFailed", "exit status N"); "javascript" or "js" (a persistent Node.js process, see node_driver.js: the last
expression's value is the main result, text/plain and, for plain objects and arrays, application/json). Each has
the same run, interrupt, restart and delete semantics and the same events. An interrupt of bash or javascript code
gives the error "Interrupted"; bash or javascript code that a timeout's SIGINT does not stop within 5 s is killed
with its process: the run ends "kernel_died" and the next one starts a fresh process.

Replies:
    run: events, the last one `end`:
        {"type": "stdout" | "stderr", "text": str}
        {"type": "result", "is_main_result": bool, "data": {mime: value},
         "chart": {...}?, "table": {"columns", "index", "rows", "total_rows", "truncated"?}?}
        {"type": "error", "name": str, "value": str, "traceback": [str]}
        {"type": "end", "execution_count": int | null, "status": "ok" | "error" | "timeout" | "kernel_died",
         "restarted": true?, "truncated": true?}
    create_context, restart_context: {"type": "context", "context": {"id", "language", "cwd", "env"}}
    list_contexts: {"type": "contexts", "contexts": [context...], "languages": [str]}
    delete_context: {"type": "deleted", "context": id};  interrupt: {"type": "interrupted", "context": id}
    warm: {"type": "warmed", "context": "default"}
    a refused request (any op): one line {"type": "error", "refused": true, "name": "context_not_found" |
        "unknown_language" (with "languages") | "bad_request" | "internal", "value": str, "traceback": []}
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

from code_contexts import Contexts
from context_base import Refused, checked_env

DEFAULT_TIMEOUT_SECONDS = 300.0
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class CodeServer:
    def __init__(self, contexts: Contexts, max_output_bytes: int):
        self.contexts = contexts
        self.max_output_bytes = max_output_bytes
        self.connections: set[asyncio.Task] = set()

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                except ValueError as error:
                    await send(writer, refused("bad_request", f"not a JSON object: {error}"))
                    continue
                await self.handle(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away, or sent a line over MAX_REQUEST_BYTES
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle(self, request: dict, writer: asyncio.StreamWriter) -> None:
        op = request.get("op")
        try:
            if op == "run":
                await self.run(request, writer)
                return
            handler = {
                "create_context": self.create_context,
                "list_contexts": self.list_contexts,
                "restart_context": self.restart_context,
                "delete_context": self.delete_context,
                "interrupt": self.interrupt,
                "warm": self.warm,
            }.get(op)
            if handler is None:
                raise Refused("bad_request", f"unknown op {op!r}")
            await send(writer, await handler(request))
        except Refused as refusal:
            await send(writer, refused(refusal.name, refusal.value, **refusal.extra))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as error:  # a kernel that would not start, a bug: say so, keep serving
            print(f"mvm-code: {op}: {error!r}", file=sys.stderr, flush=True)
            await send(writer, refused("internal", f"{type(error).__name__}: {error}"))

    async def warm(self, request: dict) -> dict:
        """The template's ready check (mvm_code_ready.py): the run path of the default Python context, exercised
        in the template snapshot and again in every pooled sandbox before any user runs code. No trace is left."""
        context = await self.contexts.default("python")
        async with context.lock:
            await context.warm()
        return {"type": "warmed", "context": context.id}

    async def run(self, request: dict, writer: asyncio.StreamWriter) -> None:
        code = request.get("code")
        if not isinstance(code, str):
            raise Refused("bad_request", "run needs `code` (a string)")
        timeout = request.get("timeout", DEFAULT_TIMEOUT_SECONDS)
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise Refused("bad_request", "timeout is a positive number of seconds, or null for none")
        env = checked_env(request.get("env"))
        if request.get("context") is not None:
            context = self.contexts.get(str(request["context"]))
        else:
            context = await self.contexts.default(request.get("language") or "python")
        async with context.lock:
            if self.contexts.by_id.get(context.id) is not context:
                raise Refused("context_not_found", f"context {context.id!r} was deleted")
            # What the context's kernel was started with is already its env: only the rest costs a swap (two extra
            # kernel round trips). The sandbox's env, which the gateway sends with every run, is mostly the template's.
            started = {**os.environ, **context.env}
            env = {name: value for name, value in env.items() if started.get(name) != value}
            context.check_env(env)
            # aclosing: a run whose client goes away ends (and restores its env) before the lock is released
            async with contextlib.aclosing(context.run(code, timeout, self.max_output_bytes, env)) as events:
                async for event in events:
                    await send(writer, event)

    async def create_context(self, request: dict) -> dict:
        context = await self.contexts.create(request.get("language"), request.get("cwd"), request.get("env"))
        return {"type": "context", "context": context.describe()}

    async def list_contexts(self, request: dict) -> dict:
        contexts = [context.describe() for context in self.contexts.by_id.values()]
        return {"type": "contexts", "contexts": contexts, "languages": self.contexts.languages()}

    async def restart_context(self, request: dict) -> dict:
        context = self.contexts.get(str(request.get("context")))
        await context.interrupt()  # a running cell ends, its run releases the lock
        async with context.lock:
            await context.restart()
        return {"type": "context", "context": context.describe()}

    async def delete_context(self, request: dict) -> dict:
        context_id = str(request.get("context"))
        context = self.contexts.get(context_id)
        await context.interrupt()
        async with context.lock:
            await self.contexts.delete(context_id)
        return {"type": "deleted", "context": context_id}

    async def interrupt(self, request: dict) -> dict:
        context = self.contexts.get(str(request.get("context")))
        await context.interrupt()
        return {"type": "interrupted", "context": context.id}


def refused(name: str, value: str, **extra) -> dict:
    return {"type": "error", "refused": True, "name": name, "value": value, "traceback": [], **extra}


async def send(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()  # a slow reader slows the run; nothing piles up here


async def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default="/run/mvm-code.sock", help="unix socket path (default %(default)s)")
    parser.add_argument(
        "--max-output-bytes", type=int, default=16 * 1024 * 1024, help="per run: stdout+stderr+results bound"
    )
    parser.add_argument("--cwd", default=None, help="default working directory of contexts (default: current)")
    args = parser.parse_args(argv)

    contexts = Contexts(args.cwd or os.getcwd())
    server = CodeServer(contexts, args.max_output_bytes)
    await contexts.default("python")  # warm before listening: the socket existing means ready
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    listener = await asyncio.start_unix_server(server.serve_connection, path=args.socket, limit=MAX_REQUEST_BYTES)
    os.chmod(args.socket, 0o600)
    print(f"mvm-code: listening on {args.socket}; languages: {', '.join(contexts.languages())}", flush=True)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    listener.close()
    for task in list(server.connections):
        task.cancel()
    await asyncio.gather(*server.connections, return_exceptions=True)
    await contexts.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)


if __name__ == "__main__":
    asyncio.run(main())
