"""The desktop template's server (images/templates/desktop/mvm_desktop_server.py) run on this host: its own Xvfb on a
free display number (a fresh MIT cookie in its own -auth file, -nolisten tcp), openbox, and the server on a socket
under a temporary directory. Needs Debian's xvfb, openbox, xdotool, x11-utils, xterm and ffmpeg (`make apt`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "images" / "templates" / "desktop" / "mvm_desktop_server.py"
HOST_TOOLS = ("Xvfb", "openbox", "xdotool", "xterm", "ffmpeg", "ffprobe")


def missing_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def free_display() -> int:
    for number in range(90, 400):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            return number
    raise RuntimeError("no free X display number in 90..399")


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (x11vnc's control and view-only ports)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two free ports in a row")


def write_xauthority(path: Path, number: int) -> None:
    """An Xauthority file with one MIT-MAGIC-COOKIE-1 for local display `number` (libXau's format)."""

    def counted(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    cookie = secrets.token_bytes(16)
    entry = struct.pack(">H", 256) + counted(socket.gethostname().encode()) + counted(str(number).encode())
    path.write_bytes(entry + counted(b"MIT-MAGIC-COOKIE-1") + counted(cookie))


def wait_for(check, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {seconds} s")
        time.sleep(0.05)


@contextlib.contextmanager
def host_desktop(home: Path, size: str = "1024x768x24"):
    """Yields (socket path, env with DISPLAY and XAUTHORITY for tools like xdotool) once the server listens."""
    home.mkdir(parents=True, exist_ok=True)
    number = free_display()
    xauthority = home / "Xauthority"
    write_xauthority(xauthority, number)
    env = {**os.environ, "DISPLAY": f":{number}", "XAUTHORITY": str(xauthority), "HOME": str(home)}
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8")
    socket_path = home / "desktop.sock"
    processes: list[subprocess.Popen] = []
    log = open(home / "desktop.log", "wb")  # noqa: SIM115 - closed below, after the processes

    def start(argv: list[str]) -> subprocess.Popen:
        processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home))
        return processes[-1]

    try:
        xvfb = start(["Xvfb", f":{number}", "-screen", "0", size, "-auth", str(xauthority), "-nolisten", "tcp"])
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists() or xvfb.poll() is not None, "Xvfb")
        start(["openbox"])
        vnc_port = free_port_pair() if shutil.which("x11vnc") else 0
        for port, extra in ((vnc_port, []), (vnc_port + 1, ["-viewonly"])):
            if vnc_port:  # as the template's session runs them: control on the port, view-only on the next
                start(["x11vnc", "-display", f":{number}", "-auth", str(xauthority), "-localhost", "-rfbport",
                       str(port), "-shared", "-forever", "-nopw", "-quiet", "-noxdamage", "-nonap",
                       *extra])  # fmt: skip
        server = start([sys.executable, str(SERVER), "--socket", str(socket_path), "--display", f":{number}",
                        "--vnc-port", str(vnc_port)])  # fmt: skip
        wait_for(lambda: socket_path.exists() or server.poll() is not None, "the desktop server listening", 60)
        if not socket_path.exists():
            raise RuntimeError(f"the desktop server did not start: {(home / 'desktop.log').read_text()}")
        wait_for(lambda: subprocess.run(["xdotool", "getactivewindow"], env=env, capture_output=True).returncode
                 in (0, 1) and openbox_running(env), "openbox managing the screen")  # fmt: skip
        yield socket_path, env
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def openbox_running(env: dict) -> bool:
    """True once a window manager has set _NET_SUPPORTING_WM_CHECK on the root window."""
    probe = subprocess.run(["xprop", "-root", "_NET_SUPPORTING_WM_CHECK"], env=env, capture_output=True, text=True)
    return "window id" in probe.stdout


class DesktopClient:
    """One connection to the server: `await client.request({"op": ...})` returns the reply line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, socket_path) -> DesktopClient:
        return cls(*await asyncio.open_unix_connection(str(socket_path), limit=64 * 1024 * 1024))

    async def request(self, message: dict, timeout: float = 60) -> dict:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()
        return json.loads(await asyncio.wait_for(self.reader.readline(), timeout))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def request(socket_path, message: dict, timeout: float = 60) -> dict:
    """One request on its own connection."""
    client = await DesktopClient.connect(socket_path)
    try:
        return await client.request(message, timeout)
    finally:
        await client.close()
