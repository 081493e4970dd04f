"""The code-interpreter template's code server run on this host (real ipykernel kernels from the venv), and an image
cache whose `code-interpreter` template reaches it: for the fake VMM, whose guests are host processes, the template's
root filesystem is a directory whose /run/mvm-code.sock is a stand-in file naming the host server's socket (the
simulated agent connects there; a disk copy or snapshot keeps a regular file, not a socket or a link out of it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "images" / "templates" / "code-interpreter" / "mvm_code_server.py"
GUEST_SOCKET = "run/mvm-code.sock"


@contextlib.contextmanager
def host_code_server(home: Path, max_output_bytes: int = 16 << 20):
    """Runs the code server with its state under `home`; yields its socket path once it listens (a warm kernel)."""
    home.mkdir(parents=True, exist_ok=True)
    socket_path = home / "code.sock"
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
        # the kernels' unix sockets: a short path of their own (a socket path has at most 107 bytes)
        "MVM_CODE_KERNEL_DIR": tempfile.mkdtemp(prefix="mvm-kernels-"),
    }
    env.pop("MPLBACKEND", None)
    argv = [sys.executable, str(SERVER), "--socket", str(socket_path), "--max-output-bytes", str(max_output_bytes)]
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen(argv, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while not socket_path.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the code server did not start: {(home / 'server.log').read_text()}")
                time.sleep(0.05)
            yield socket_path
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(env["MVM_CODE_KERNEL_DIR"], ignore_errors=True)


def add_guest_server_image(image_root: Path, template: str, sockets: dict[str, Path]) -> None:
    """A fake-VMM build of `template` in `image_root` whose guests find host servers at the guest paths of `sockets`
    (stand-in files the simulated agent reads)."""
    build = image_root / template / "fakebuild0001"
    rootfs = build / "rootfs.ext4"  # the fake VMM copies a directory in the image's place as the guest's files
    for sub in ("root", "tmp", "etc", "home/user", "run"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    for guest_path, host_socket in sockets.items():
        (rootfs / guest_path.lstrip("/")).write_text(f"mvm-simulated-socket:{host_socket}\n")
    (build / "manifest.json").write_text(json.dumps({"template": template, "rootfs_size_mib": 1024}))
    (build / ".complete").touch()
    (image_root / template / "current").write_text(build.name)


def add_code_interpreter_image(image_root: Path, socket_path: Path, template: str = "code-interpreter") -> None:
    """A fake-VMM build of `template` whose guests find the host code server at /run/mvm-code.sock."""
    add_guest_server_image(image_root, template, {"/" + GUEST_SOCKET: socket_path})


async def request(socket_path: str, message: dict) -> list[dict]:
    """Sends one request to a code server; returns its reply lines (for `run`, every event up to `end`)."""
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=64 * 1024 * 1024)
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        events = []
        while line := await asyncio.wait_for(reader.readline(), 60):
            events.append(json.loads(line))
            if message["op"] != "run" or events[-1]["type"] == "end" or events[-1].get("refused"):
                break
        return events
    finally:
        writer.close()
        await writer.wait_closed()


async def run(socket_path: str, code: str, **fields) -> list[dict]:
    return await request(socket_path, {"op": "run", "code": code, **fields})


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["type"] == kind]


def text(events: list[dict], kind: str = "stdout") -> str:
    return "".join(event["text"] for event in of_type(events, kind))
