"""Applications started on the desktop (`launch`) and the screen recording (`record_start`, `record_stop`: ffmpeg's
x11grab, VP8 in WebM or H.264 in MP4, stopped with `q` so the file is finalized)."""

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import time

from desktop_base import Refused

NAMED_APPS = {
    "chromium": [["chromium", "--no-first-run", "--no-default-browser-check", "--password-store=basic"]],
    "terminal": [["xfce4-terminal"], ["xterm"], ["x-terminal-emulator"]],
    "files": [["pcmanfm"], ["thunar"]],
}
CODECS = {
    ".webm": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "2M", "-pix_fmt", "yuv420p"],
    ".mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart"],
}


class Launcher:
    """Starts applications detached (their own session, stdio to /dev/null) with DISPLAY set; reaps them."""

    def __init__(self, display_name: str):
        self.env = {**os.environ, "DISPLAY": display_name}
        self.children: set[asyncio.Task] = set()

    def argv(self, app: str, args: list[str]) -> list[str]:
        for candidate in NAMED_APPS.get(app, [[app]]):
            if shutil.which(candidate[0]):
                argv = list(candidate)
                if candidate[0] == "chromium" and os.geteuid() == 0:
                    argv += ["--no-sandbox", "--test-type"]  # root has no user namespace sandbox; no warning bar
                return argv + args
        known = ", ".join(NAMED_APPS)
        raise Refused("not_found", f"no application {app!r} on this desktop ({known}, or an executable on PATH)")

    async def launch(self, request: dict) -> int:
        app, args = request.get("app"), request.get("args") or []
        if not isinstance(app, str) or not app or "\0" in app:
            raise Refused("bad_request", "app is chromium, terminal, files, or an executable name")
        if not isinstance(args, list) or len(args) > 256 or not all(isinstance(a, str) and "\0" not in a for a in args):
            raise Refused("bad_request", "args is a list of at most 256 strings")
        process = await asyncio.create_subprocess_exec(
            *self.argv(app, args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        reaper = asyncio.create_task(process.wait())
        self.children.add(reaper)
        reaper.add_done_callback(self.children.discard)
        return process.pid


class Recorder:
    """One recording at a time, of the whole screen."""

    def __init__(self, display_name: str):
        self.display_name = display_name
        self.process: asyncio.subprocess.Process | None = None
        self.path = ""
        self.started = 0.0
        self.count = 0
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self.stderr_task: asyncio.Task | None = None

    def checked_path(self, path) -> str:
        if path is None:
            self.count += 1
            return f"/tmp/recording-{self.count}.webm"
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise Refused("bad_request", f"path is an absolute path ending .webm or .mp4, not {path!r}")
        if os.path.splitext(path)[1].lower() not in CODECS:
            raise Refused("bad_request", f"path {path!r} ends .webm (VP8) or .mp4 (H.264)")
        if not os.path.isdir(os.path.dirname(path)):
            raise Refused("bad_request", f"the directory of {path!r} does not exist")
        return path

    async def start(self, path, fps: int, width: int, height: int) -> str:
        if self.process is not None and self.process.returncode is None:
            raise Refused("bad_request", f"a recording to {self.path} is running: record_stop first", path=self.path)
        path = self.checked_path(path)
        if not shutil.which("ffmpeg"):
            raise Refused("internal", "ffmpeg is not installed")
        argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "x11grab", "-framerate", str(fps)]
        argv += ["-video_size", f"{width}x{height}", "-draw_mouse", "1", "-i", self.display_name]
        argv += ["-r", str(fps), *CODECS[os.path.splitext(path)[1].lower()], path]
        self.errors.clear()
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        self.stderr_task = asyncio.create_task(self._collect_errors(self.process.stderr))
        self.path, self.started = path, time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 0.5)  # a bad display or codec fails at once
            raise Refused("internal", f"ffmpeg stopped at once: {self._error_text(self.process)}")
        return path

    async def _collect_errors(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.errors.append(line.decode(errors="replace").rstrip())

    def _error_text(self, process: asyncio.subprocess.Process) -> str:
        return " | ".join(self.errors) or f"ffmpeg exit status {process.returncode}"

    async def stop(self) -> dict:
        process = self.process
        if process is None:
            raise Refused("bad_request", "no recording is running (record_start first)")
        seconds = time.monotonic() - self.started
        if process.returncode is None:
            with contextlib.suppress(ConnectionError):
                process.stdin.write(b"q")
                await process.stdin.drain()
            for stop in (None, signal.SIGINT, signal.SIGKILL):
                if stop is not None and process.returncode is None:
                    process.send_signal(stop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 15)
                    break
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.stderr_task, 5)
        self.process = None
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if process.returncode not in (0, 255) or size == 0:  # 255: ffmpeg stopped by a signal, file finalized
            raise Refused("internal", f"the recording to {self.path} failed: {self._error_text(process)}")
        return {"type": "recorded", "path": self.path, "bytes": size, "seconds": round(seconds, 3)}

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(Refused):
                await self.stop()
