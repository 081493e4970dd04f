"""The desktop session of the `desktop` template (its start command): Xvfb, a window manager, x11vnc for live view
and the desktop server, each restarted a second after it exits, all stopped on SIGTERM.

    python3 desktop_session.py [--display :0] [--size 1024x768x24] [--socket /run/mvm-desktop.sock]
                               [--vnc-port 5900] [--wm openbox]

--size defaults to $MVM_DESKTOP_SIZE, else 1024x768x24 (WIDTHxHEIGHTxDEPTH). x11vnc listens on 127.0.0.1 only
(-shared -forever -nopw: the relay's port forward is the way in), and a view-only one on the next port; --vnc-port 0
starts none. The server listens once the display answers, so its socket is the ready check. Output of all of them
goes to this process's stdout.
"""

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKGROUND = 0x2F4F6F  # a plain slate blue: a screenshot of an empty desktop is not black
# -nonap: by default x11vnc naps between polls of a screen that changes little and, once the screen has not changed
# for 60 s (-sb), sleeps ~2 s per poll: a viewer of a desktop left idle got ~1.8 full frames/s instead of ~10, and saw
# the next change up to 2 s late. Without naps it polls every 20 ms (-wait) while a viewer is connected (on this
# host: ~46 fps before and after 200 s idle, against 42 fresh and 7 idle by default; ~1.4% of a core with a viewer
# watching a still screen, against 0.7%). With nobody connected it polls nothing either way (it checks for a client
# every 200 ms: 0.06% of a core).
X11VNC_OPTIONS = ["-shared", "-forever", "-nopw", "-quiet", "-noxdamage", "-nonap"]


def set_background(display_name: str) -> None:
    from Xlib import display

    conn = display.Display(display_name)
    try:
        root = conn.screen().root
        root.change_attributes(background_pixel=BACKGROUND)
        root.clear_area()
        conn.sync()
    finally:
        conn.close()


async def display_answers(display_name: str, seconds: float) -> bool:
    from Xlib import display, error

    for _ in range(int(seconds * 10)):
        try:
            display.Display(display_name).close()
            return True
        except (error.DisplayError, ConnectionError):
            await asyncio.sleep(0.1)
    return False


async def keep_running(name: str, argv: list[str], env: dict, ready: asyncio.Event | None, stopping: asyncio.Event):
    """Runs argv until stopping; restarts it a second after it exits. `ready`: wait for it before each start."""
    while not stopping.is_set():
        if ready is not None:
            await ready.wait()
        process = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL)
        print(f"mvm-desktop-session: started {name} (pid {process.pid})", flush=True)
        waiting = asyncio.create_task(process.wait())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(waiting, 10)
            except TimeoutError:
                process.kill()
                await waiting
            return
        print(f"mvm-desktop-session: {name} exited ({process.returncode}); restarting", flush=True)
        await asyncio.sleep(1)


async def watch_display(display_name: str, ready: asyncio.Event, stopping: asyncio.Event) -> None:
    """Sets `ready` while the display answers (clears it when Xvfb is gone, until it is back)."""
    while not stopping.is_set():
        if await display_answers(display_name, 1):
            if not ready.is_set():
                with contextlib.suppress(Exception):
                    set_background(display_name)
                ready.set()
        else:
            ready.clear()
        await asyncio.sleep(1)


async def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--display", default=":0")
    parser.add_argument("--size", default=os.environ.get("MVM_DESKTOP_SIZE") or "1024x768x24")
    parser.add_argument("--socket", default="/run/mvm-desktop.sock")
    parser.add_argument("--vnc-port", type=int, default=5900)
    parser.add_argument("--wm", default="openbox")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[1-9]\d{2,4}x[1-9]\d{2,4}x(16|24)", args.size):
        parser.error(f"--size is WIDTHxHEIGHTxDEPTH (depth 16 or 24), not {args.size!r}")

    env = {**os.environ, "DISPLAY": args.display}
    env.setdefault("HOME", "/root")
    env.setdefault("LANG", "C.UTF-8")
    stopping, ready = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    xvfb = ["Xvfb", args.display, "-screen", "0", args.size, "-nolisten", "tcp", "-dpi", "96"]
    server = [sys.executable, str(HERE / "mvm_desktop_server.py"), "--socket", args.socket]
    children = [
        ("Xvfb", xvfb, env, None),
        (args.wm, [args.wm], env, ready),
        ("desktop server", server + ["--display", args.display, "--vnc-port", str(args.vnc_port)], env, ready),
    ]
    if args.vnc_port and shutil.which("x11vnc"):
        vnc = ["x11vnc", "-display", args.display, "-localhost", "-rfbport", str(args.vnc_port)]
        children.append(("x11vnc", vnc + X11VNC_OPTIONS, env, ready))
        # The port above + 1 serves view-only viewers: their input is dropped by x11vnc itself, so a view token
        # cannot drive the desktop whatever its client sends.
        view = ["x11vnc", "-display", args.display, "-localhost", "-rfbport", str(args.vnc_port + 1), "-viewonly"]
        children.append(("x11vnc-view", view + X11VNC_OPTIONS, env, ready))
    x_stopping = asyncio.Event()  # Xvfb stops last, once nothing on the display is left to complain
    tasks = [asyncio.create_task(keep_running(*children[0], x_stopping))]
    tasks += [
        asyncio.create_task(keep_running(name, argv_, env_, wait, stopping)) for name, argv_, env_, wait in children[1:]
    ]
    tasks.append(asyncio.create_task(watch_display(args.display, ready, stopping)))
    await stopping.wait()
    await asyncio.gather(*tasks[1:], return_exceptions=True)
    x_stopping.set()
    await tasks[0]


if __name__ == "__main__":
    asyncio.run(main())
