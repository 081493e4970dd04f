#!/usr/bin/env python3
"""A stand-in `cloud-hypervisor` for hosts without KVM: serves the REST API on `--api-socket path=...`,
checks every request against Cloud Hypervisor's OpenAPI spec (unknown endpoint: 404, invalid body: 400,
both recorded), keeps the VM state machine, and logs each request as a JSON line to $FAKE_CH_LOG.
It boots nothing: it checks the driver's side of the contract, not a guest."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fakes.cloud_hypervisor_spec import operation, request_schema, validate  # noqa: E402

STATE = {"vm": None, "config": None}


def transition(endpoint: str, body) -> tuple[int, object]:
    vm = STATE["vm"]
    if endpoint == "vmm.ping":
        return 200, {"version": "v0-fake", "pid": os.getpid(), "features": []}
    if endpoint == "vm.create":
        if vm is not None:
            return 400, "VM already created"
        STATE["vm"], STATE["config"] = "Created", body
        return 204, None
    if endpoint == "vm.restore":
        if vm is not None:
            return 404, "VM already created"
        config = json.loads((Path(body["source_url"].removeprefix("file://")) / "config.json").read_text())
        STATE["vm"], STATE["config"] = "Paused", config
        return 204, None
    if vm is None:
        return 404, "VM is not created"
    moves = {
        "vm.boot": ("Created", "Running"),
        "vm.pause": ("Running", "Paused"),
        "vm.resume": ("Paused", "Running"),
        "vm.shutdown": (None, "Shutdown"),
    }
    if endpoint in moves:
        before, after = moves[endpoint]
        if before and vm != before:
            return 405, f"VM is {vm}"
        STATE["vm"] = after
        return 204, None
    if endpoint == "vm.info":
        return 200, {"config": STATE["config"], "state": vm}
    if endpoint == "vm.counters":
        return 200, {"_disk0": {"read_bytes": 0, "write_bytes": 0}}
    if endpoint == "vm.snapshot":
        if vm != "Paused":
            return 405, "VM must be paused"
        target = Path(body["destination_url"].removeprefix("file://"))
        (target / "config.json").write_text(json.dumps(STATE["config"]))
        (target / "state.json").write_text("{}")
        (target / "memory-ranges").write_bytes(b"\0" * 4096)
        return 204, None
    if endpoint in ("vm.resize", "vm.delete"):
        return 204, None
    return 204, None


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line = (await reader.readline()).decode()
    method, target, _ = request_line.split(" ", 2)
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    raw = await reader.readexactly(length) if length else b""
    endpoint = target.removeprefix("/api/v1/")
    body = json.loads(raw) if raw else None
    entry = {"method": method, "endpoint": endpoint, "body": body, "errors": []}
    if operation(method, endpoint) is None:
        status, reply = 404, f"{method} /{endpoint} is not in the Cloud Hypervisor API"
        entry["errors"].append(reply)
    else:
        schema = request_schema(method, endpoint)
        if schema is not None:
            entry["errors"] = validate(schema, body) if body is not None else ["missing required request body"]
        status, reply = (400, "; ".join(entry["errors"])) if entry["errors"] else transition(endpoint, body)
    with open(os.environ.get("FAKE_CH_LOG", "/dev/null"), "a") as log:
        log.write(json.dumps(entry) + "\n")
    payload = b"" if reply is None else (json.dumps(reply) if not isinstance(reply, str) else reply).encode()
    reason = {200: "OK", 204: "No Content"}.get(status, "Error")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(payload)}\r\n"
        f"Content-Type: application/json\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    writer.close()
    if endpoint == "vmm.shutdown":
        asyncio.get_running_loop().call_soon(sys.exit, 0)


async def main() -> None:
    args = sys.argv[1:]
    socket_path = next(a.split("=", 1)[1] for a in args[args.index("--api-socket") + 1 :][:1])
    server = await asyncio.start_unix_server(handle, socket_path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
