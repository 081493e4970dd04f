"""Stateful code: `mvm code ID [FILE|-]` runs code in a sandbox's kernel (state persists between calls), streaming its
output, printing text results and saving images to files; `mvm code-context ls|create|restart|interrupt|rm` manages
the kernels (contexts). The sandbox needs a template with the code server (`code-interpreter`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from microvm_sandbox import CodeContext, Execution, Result
from mvm_cli.context import Context, for_each
from mvm_cli.output import emit, table
from mvm_cli.parsing import CliError, add_json, add_listing, command_parser, parse_duration, parse_pairs

CONTEXT_COLUMNS = ("CONTEXT", "LANGUAGE", "CWD", "ENV")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "svg": "svg", "pdf": "pdf"}


def register(sub) -> None:
    code = command_parser(
        sub,
        "code",
        "run code in a sandbox's kernel (state persists between calls)",
        "mvm code sbx-1a2b3c -c 'x = 41'\nmvm code sbx-1a2b3c -c 'x + 1'\nmvm code sbx-1a2b3c plot.py --out plots/",
        description="Run code in a Jupyter kernel of the sandbox (its template needs the code server: "
        "`mvm create --template code-interpreter`). Variables and imports persist between calls of one context. "
        "Output streams as it comes; the cell's value and other text results are printed; images and PDFs are "
        "saved to files (their paths printed). Exit status 1 when the code raised or timed out (the traceback "
        "goes to stderr).",
    )
    code.add_argument("id", metavar="ID", help="the sandbox's id")
    code.add_argument("file", nargs="?", metavar="FILE", help="the code's file; `-` or none: standard input")
    code.add_argument("-c", "--code", dest="source", metavar="CODE", help="the code itself, instead of a file")
    code.add_argument("--language", "-l", default=None, help="python (default) or another the template has")
    code.add_argument("--context", default=None, help="the context to run in (default: the language's own)")
    code.add_argument(
        "--timeout",
        dest="run_timeout",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="interrupt the code after this long (the state is kept): seconds or 90s, 30m (default: 5m)",
    )
    code.add_argument("--env", "-e", action="append", metavar="KEY=VALUE", help="for this run only (repeatable)")
    code.add_argument("--out", default=".", metavar="DIR", help="where images and PDFs are saved")
    code.add_argument("--json", action="store_true", help="print the execution as JSON (images as base64), no files")
    code.set_defaults(handler=code_command)

    contexts = command_parser(
        sub,
        "code-context",
        "list, create, restart, interrupt and delete code contexts",
        "mvm code-context create sbx-1a2b3c --language python\nmvm code-context ls sbx-1a2b3c",
        description="Code contexts are kernels of their own: state is per context, two contexts never see each "
        "other's variables. Each language has a default one (`default` for python).",
        aliases=["code-contexts"],
    )
    actions = contexts.add_subparsers(dest="action", metavar="{ls,create,restart,interrupt,rm}", required=True)
    ls = command_parser(
        actions, "ls", "list a sandbox's code contexts", "mvm code-context ls sbx-1a2b3c", aliases=["list"]
    )
    ls.add_argument("id", metavar="ID", help="the sandbox's id")
    add_listing(ls, "context ids")
    ls.set_defaults(handler=list_contexts_command)
    create = command_parser(
        actions, "create", "create a code context and print its id", "mvm code-context create sbx-1a2b3c -l python"
    )
    create.add_argument("id", metavar="ID", help="the sandbox's id")
    create.add_argument("--language", "-l", default="python", help="its language")
    create.add_argument("--cwd", "-w", default=None, metavar="DIR", help="its working directory")
    create.add_argument("--env", "-e", action="append", metavar="KEY=VALUE", help="its environment (repeatable)")
    add_json(create)
    create.set_defaults(handler=create_context_command)
    for verb, text in (
        ("restart", "give code contexts fresh kernels (their state is lost)"),
        ("interrupt", "interrupt the code running in code contexts (their state is kept)"),
        ("rm", "delete code contexts and stop their kernels"),
    ):
        parser = command_parser(actions, verb, text, f"mvm code-context {verb} sbx-1a2b3c ctx-1")
        parser.add_argument("id", metavar="ID", help="the sandbox's id")
        parser.add_argument("contexts", nargs="+", metavar="CONTEXT", help="context ids (mvm code-context ls)")
        parser.set_defaults(handler=change_contexts_command, verb=verb)


# --- mvm code -------------------------------------------------------------------------------------------------
def read_code(args) -> str:
    """The code from -c, FILE, or standard input (`-` or no FILE)."""
    if args.source is not None:
        if args.file is not None:
            raise CliError("mvm code: give the code with -c or as FILE, not both")
        return args.source
    if args.file not in (None, "-"):
        try:
            return Path(args.file).read_text()
        except OSError as error:
            raise CliError(f"mvm code: cannot read {args.file}: {error.strerror}") from None
    if sys.stdin.isatty():
        raise CliError("mvm code: no code: give FILE, -c CODE, or pipe it in")
    return sys.stdin.read()


def save_files(result: Result, out: Path, stem: str) -> list[Path]:
    """Writes each image or PDF form of `result` to OUT/STEM.EXT; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    return [result.save(out / f"{stem}.{EXTENSIONS[form]}", form) for form in result.file_forms()]


def show_results(execution: Execution, sandbox_id: str, out: Path) -> None:
    """Prints text results and saves file forms (printing their paths), in the order they came."""
    count = execution.execution_count or 0
    for index, result in enumerate(execution.results, 1):
        paths = save_files(result, out, f"{sandbox_id}-{count}-{index}")
        for path in paths:
            emit(str(path))
        if not paths and result.text is not None:
            emit(result.text)


def write_live(stream):
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def code_command(ctx: Context, args) -> int:
    code = read_code(args)
    sandbox = ctx.sandbox_by_name(args.id)
    live = not args.json
    execution = sandbox.run_code(
        code,
        args.language,
        context=args.context,
        on_stdout=write_live(sys.stdout) if live else None,
        on_stderr=write_live(sys.stderr) if live else None,
        timeout=args.run_timeout,
        envs=parse_pairs(args.env, "env") or None,
    )
    if args.json:
        emit(execution.to_json(indent=2))
    else:
        show_results(execution, sandbox.id, Path(args.out))
        if execution.error is not None:
            print(execution.error.traceback or str(execution.error), file=sys.stderr)
        if execution.status == "timeout":
            print("mvm: the code was interrupted by its timeout (the context keeps its state)", file=sys.stderr)
        elif execution.status == "kernel_died":
            print("mvm: the kernel died; the context's next run starts a fresh one", file=sys.stderr)
    return 0 if execution.status == "ok" else 1


# --- mvm code-context -----------------------------------------------------------------------------------------
def context_row(context: CodeContext) -> list[str]:
    envs = ",".join(f"{key}={value}" for key, value in sorted(context.envs.items()))
    return [context.id, context.language, context.cwd or "-", envs or "-"]


def list_contexts_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox_by_name(args.id)
    contexts = sandbox.list_code_contexts()
    if args.json:
        languages = sandbox.list_code_languages()
        emit(json.dumps({"contexts": [c.to_dict() for c in contexts], "languages": languages}, indent=2))
    elif args.quiet:
        emit("\n".join(context.id for context in contexts))
    else:
        emit(table(CONTEXT_COLUMNS, [context_row(c) for c in contexts], header=not args.no_headers))
    return 0


def create_context_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox_by_name(args.id)
    context = sandbox.create_code_context(args.language, args.cwd, parse_pairs(args.env, "env") or None)
    if args.json:
        emit(json.dumps(context.to_dict(), indent=2))
    else:
        emit(context.id)
    return 0


def change_contexts_command(ctx: Context, args) -> int:
    sandbox = ctx.sandbox_by_name(args.id)
    change = {
        "restart": (sandbox.restart_code_context, "restarted"),
        "interrupt": (sandbox.interrupt_code, "interrupted"),
        "rm": (sandbox.delete_code_context, "deleted"),
    }
    method, done = change[args.verb]

    def apply(context: str) -> str:
        method(context)
        return f"{done} {context}"

    return for_each(args.contexts, apply, f"code-context {args.verb}", noun="context")
