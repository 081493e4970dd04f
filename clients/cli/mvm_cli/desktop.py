"""Computer use from the shell: `mvm desktop ID ACTION ...` looks at and drives the graphical desktop of a sandbox made
from the `desktop` template (the SDK's `sandbox.desktop`): screenshot, click, move, drag, type, press, scroll,
launch, windows, focus, close, wait, record start|stop, and `url`: a link that shows the desktop live in a browser
(noVNC through the gateway; view-only unless --control)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from microvm_sandbox import Sandbox, Window
from mvm_cli.context import Context
from mvm_cli.output import emit, table
from mvm_cli.parsing import CliError, add_listing, command_parser

WINDOW_COLUMNS = ("WINDOW", "TITLE", "PID", "GEOMETRY", "FOCUSED")


def numbers(count: int, what: str):
    """An argparse type for `count` comma-separated integers (`X,Y` or `X,Y,W,H`)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return values

    return parse


def scale_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the scale is a number in (0, 1], e.g. 0.5")
    return value


def register(sub) -> None:
    desktop = command_parser(
        sub,
        "desktop",
        "see and drive a sandbox's graphical desktop (template `desktop`)",
        "mvm desktop sbx-1a2b3c launch terminal\nmvm desktop sbx-1a2b3c wait --stable\n"
        "mvm desktop sbx-1a2b3c type 'echo hi\\n'\nmvm desktop sbx-1a2b3c screenshot -o screen.png",
        description="Screenshots, mouse, keyboard, applications, windows, waiting for the screen and recording it, "
        "on a sandbox created from the `desktop` template (or one built from it). Coordinates are screen pixels "
        "from the top left. A sandbox without a display fails with FAILED_PRECONDITION.",
    )
    desktop.add_argument("id", metavar="ID", help="the sandbox's id")
    actions = desktop.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str, example: str, handler, **kwargs) -> argparse.ArgumentParser:
        parser = command_parser(actions, name, help, f"mvm desktop sbx-1a2b3c {example}", **kwargs)
        parser.set_defaults(handler=handler)
        return parser

    shot = action("screenshot", "save a PNG of the screen", "screenshot -o screen.png --scale 0.5", screenshot_command)
    shot.add_argument("-o", "--output", default=None, metavar="FILE", help="where (`-`: standard output)")
    shot.add_argument("--region", type=numbers(4, "X,Y,W,H"), default=None, metavar="X,Y,W,H", help="only this part")
    shot.add_argument("--scale", type=scale_value, default=None, metavar="S", help="scale by S in (0, 1]")

    click = action("click", "click at a point", "click 200 150 --double", click_command)
    click.add_argument("x", type=int, metavar="X")
    click.add_argument("y", type=int, metavar="Y")
    click.add_argument("--button", choices=["left", "right", "middle"], default="left", help="which button")
    click.add_argument("--double", action="store_true", help="a double click")

    move = action("move", "move the cursor", "move 200 150", move_command)
    move.add_argument("x", type=int, metavar="X")
    move.add_argument("y", type=int, metavar="Y")

    drag = action("drag", "drag with the left button from one point to another", "drag 10 10 300 200", drag_command)
    for name in ("x1", "y1", "x2", "y2"):
        drag.add_argument(name, type=int, metavar=name.upper())

    typed = action("type", "type text (a newline presses Return)", "type 'hello world'", type_command)
    typed.add_argument("text", metavar="TEXT", help="any Unicode; `\\n` in it is typed as Return")

    press = action("press", "press keys or combinations, in order", "press ctrl+l Return", press_command)
    press.add_argument("keys", nargs="+", metavar="KEY", help="e.g. Return, ctrl+l, alt+F4 (an unknown one is listed)")

    scroll = action("scroll", "turn the mouse wheel", "scroll down 5 --at 500,400", scroll_command)
    scroll.add_argument("direction", choices=["up", "down", "left", "right"], metavar="DIRECTION", help="up|down|…")
    scroll.add_argument("amount", type=int, nargs="?", default=1, metavar="AMOUNT", help="wheel steps, 1-100")
    scroll.add_argument("--at", type=numbers(2, "X,Y"), default=None, metavar="X,Y", help="where (default: the cursor)")

    launch = action("launch", "start an application and print its pid", "launch chromium https://example.com", None)
    launch.add_argument("app", metavar="APP", help="chromium, terminal, files, or an executable's name")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    launch.set_defaults(handler=launch_command)

    windows = action("windows", "list the top-level windows", "windows", windows_command)
    add_listing(windows, "window ids")
    for verb, text in (("focus", "raise and focus a window"), ("close", "close a window as its close button does")):
        parser = action(verb, text, f"{verb} 0x1c00003", window_command)
        parser.add_argument("window", metavar="WINDOW", help="a window id (mvm desktop ID windows)")
        parser.set_defaults(verb=verb)

    wait = action(
        "wait",
        "wait until the screen changes (or, with --stable, stops changing)",
        "wait --stable --timeout 20",
        wait_command,
        description="Wait until the screen (or a region) changes; with --stable, until it has not changed for "
        "--stable-for seconds. Prints `changed`, `stable` or `timeout`; exit status 1 on timeout.",
    )
    wait.add_argument("--stable", action="store_true", help="wait until it stops changing")
    wait.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (max 300)")
    wait.add_argument("--stable-for", type=float, default=1.0, metavar="S", help="with --stable: for this long")
    wait.add_argument("--region", type=numbers(4, "X,Y,W,H"), default=None, metavar="X,Y,W,H", help="only this part")

    record = action("record", "record the screen to a file in the sandbox", "record start", record_command)
    record.add_argument("verb", choices=["start", "stop"], metavar="start|stop")
    record.add_argument("--path", default=None, help="start: the file in the sandbox (.webm or .mp4)")
    record.add_argument("--fps", type=int, default=10, help="start: frames per second, 1-30")
    record.add_argument("-o", "--output", default=None, metavar="FILE", help="stop: download the recording here")

    url = action("url", "print a URL that shows the desktop live in a browser", "url --control", url_command)
    url.add_argument("--control", action="store_true", help="the viewer may use keyboard and mouse too")
    url.add_argument("--ttl", type=float, default=600, metavar="S", help="seconds the link admits viewers (max 3600)")
    url.add_argument("--open", action="store_true", help="open it in this machine's browser")


def _sandbox(ctx: Context, args) -> Sandbox:
    return ctx.sandbox_by_name(args.id)


def screenshot_command(ctx: Context, args) -> int:
    png = _sandbox(ctx, args).desktop.screenshot(args.region, args.scale)
    if args.output == "-":
        sys.stdout.buffer.write(png)
        sys.stdout.flush()
        return 0
    path = Path(args.output or f"{args.id}-screen.png")
    path.write_bytes(png)
    emit(str(path))
    return 0


def click_command(ctx: Context, args) -> int:
    desktop = _sandbox(ctx, args).desktop
    if args.double:
        if args.button != "left":
            raise CliError("mvm desktop click: --double clicks the left button")
        desktop.double_click(args.x, args.y)
    else:
        getattr(desktop, f"{args.button}_click")(args.x, args.y)
    return 0


def move_command(ctx: Context, args) -> int:
    _sandbox(ctx, args).desktop.move(args.x, args.y)
    return 0


def drag_command(ctx: Context, args) -> int:
    _sandbox(ctx, args).desktop.drag((args.x1, args.y1), (args.x2, args.y2))
    return 0


def type_command(ctx: Context, args) -> int:
    _sandbox(ctx, args).desktop.write(args.text.replace("\\n", "\n"))
    return 0


def press_command(ctx: Context, args) -> int:
    _sandbox(ctx, args).desktop.press(args.keys)
    return 0


def scroll_command(ctx: Context, args) -> int:
    x, y = args.at if args.at else (None, None)
    _sandbox(ctx, args).desktop.scroll(args.direction, args.amount, x, y)
    return 0


def launch_command(ctx: Context, args) -> int:
    emit(str(_sandbox(ctx, args).desktop.launch(args.app, *args.args)))
    return 0


def window_row(window: Window) -> list[object]:
    geometry = f"{window.width}x{window.height}+{window.x}+{window.y}"
    return [window.id, window.title or "-", window.pid or "-", geometry, "yes" if window.focused else ""]


def windows_command(ctx: Context, args) -> int:
    found = _sandbox(ctx, args).desktop.windows()
    if args.json:
        emit(json.dumps([window.to_dict() for window in found], indent=2))
    elif args.quiet:
        emit("\n".join(window.id for window in found))
    else:
        emit(table(WINDOW_COLUMNS, [window_row(w) for w in found], header=not args.no_headers))
    return 0


def window_command(ctx: Context, args) -> int:
    desktop = _sandbox(ctx, args).desktop
    (desktop.focus if args.verb == "focus" else desktop.close)(args.window)
    return 0


def wait_command(ctx: Context, args) -> int:
    desktop = _sandbox(ctx, args).desktop
    if args.stable:
        done = desktop.wait_until_stable(args.timeout, args.stable_for, args.region)
        emit("stable" if done else "timeout")
    else:
        done = desktop.wait_for_change(args.timeout, args.region)
        emit("changed" if done else "timeout")
    return 0 if done else 1


def record_command(ctx: Context, args) -> int:
    sandbox = _sandbox(ctx, args)
    desktop = sandbox.desktop
    if args.verb == "start":
        if args.output:
            raise CliError("mvm desktop record start: -o is for `record stop` (the file is downloaded then)")
        emit(desktop.record(args.path, args.fps).path)
        return 0
    info = desktop.stop_recording()  # started by another mvm process: the sandbox has one at a time
    if args.output:
        sandbox.download(info.path, args.output)
        emit(f"{args.output} ({info.size_bytes} bytes, {info.seconds:.1f} s; in the sandbox: {info.path})")
    else:
        emit(f"{info.path} ({info.size_bytes} bytes, {info.seconds:.1f} s)")
    return 0


def url_command(ctx: Context, args) -> int:
    link = _sandbox(ctx, args).desktop.stream_url(view_only=not args.control, ttl=args.ttl)
    emit(link)
    if args.open:
        import webbrowser

        webbrowser.open(link)
    return 0
