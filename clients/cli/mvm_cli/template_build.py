"""`mvm template build`: sends a recipe or a Dockerfile and its context, and shows the build live on stderr (each
step as it starts, is cached, ends or fails, and its output); stdout gets the build (`TEMPLATE/BUILD`, or --json).
Exit status 0 when it succeeded, 1 when it failed (the failed step and its last output lines on stderr)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from microvm.sandbox.v1 import template_pb2, template_service_pb2
from microvm_sandbox import BuildProgress, Template, TemplateBuildFailed
from microvm_sandbox.templates import build_ref
from mvm_cli.context import Context
from mvm_cli.output import emit, to_json
from mvm_cli.parsing import CliError, add_json, command_parser, parse_duration, parse_pairs

DEFINITIONS = ("mvm.yaml", "mvm.yml", "Dockerfile")
LAST_LINES = 10
STEP = template_pb2.TemplateStepState


def register(actions) -> None:
    build = command_parser(
        actions,
        "build",
        "build a template from a recipe (mvm.yaml) or a Dockerfile",
        "mvm template build -f mvm.yaml .\n"
        "mvm template build --dockerfile Dockerfile --name web --tag v1 --build-arg VERSION=2 ./app",
        description="Build a template: send its definition and the build context (the CONTEXT directory as a tar "
        "stream, minus what its .mvmignore, else .dockerignore, excludes), then show each step and its output as "
        "the builder runs it. Without -f or --dockerfile: CONTEXT's mvm.yaml, else its Dockerfile. The context "
        "defaults to the definition's directory. Prints TEMPLATE/BUILD (for `mvm template logs`); exit status 1 "
        "when the build fails, with the failed step and its last output lines. Interrupting stops following; "
        "the build goes on (`mvm template logs TEMPLATE/BUILD --follow`).",
    )
    source = build.add_mutually_exclusive_group()
    source.add_argument(
        "-f", "--file", metavar="FILE", help="the definition: a recipe when it ends in .yaml/.yml, else a Dockerfile"
    )
    source.add_argument("--dockerfile", metavar="FILE", help="a Dockerfile, whatever its name")
    build.add_argument("context", nargs="?", metavar="CONTEXT", help="the build context directory")
    build.add_argument("--name", metavar="NAME[:TAG]", help="the template (default: the recipe's `name:`)")
    build.add_argument(
        "-t", "--tag", action="append", metavar="TAG", help="a tag the build gets when it succeeds (repeatable)"
    )
    build.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="an ARG value (repeatable)")
    build.add_argument("--no-cache", action="store_true", help="run every step even when its layer is cached")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress: print only the result")
    build.add_argument(
        "--timeout",
        type=parse_duration,
        default=3600,
        metavar="DURATION",
        help="stop following after this long (the build goes on)",
    )
    add_json(build)
    build.set_defaults(handler=build_command)


def definition(args) -> Template:
    """The Template the command line names: -f / --dockerfile, else CONTEXT's mvm.yaml or Dockerfile."""
    context = Path(args.context) if args.context else None
    path = Path(args.dockerfile or args.file or "")
    if not (args.dockerfile or args.file):
        base = context or Path(".")
        found = [base / name for name in DEFINITIONS if (base / name).is_file()]
        if not found:
            raise CliError(f"no mvm.yaml or Dockerfile in {base}: give -f FILE or --dockerfile FILE")
        path = found[0]
    try:
        if args.dockerfile:
            template = Template.from_dockerfile(path, context=context)
        else:
            template = Template.from_file(path, context=context)
    except OSError as error:
        raise CliError(f"{error.strerror or error}: {path}") from None
    if not (args.name or template.name):
        raise CliError("name the template: --name NAME (a Dockerfile has no name; a recipe may say `name:`)")
    return template


def seconds(milliseconds: int) -> str:
    return f"{milliseconds / 1000:.1f}s"


class BuildPrinter:
    """A build's events as lines: `[2/5] RUN make`, its output indented under `  | `, `[2/5] done in 3.1s`."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.total = 0
        self.line_open = False  # the last output did not end with a newline
        self.announced = False

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        if self.line_open:
            self.write("\n")
            self.line_open = False
        self.write(text + "\n")

    def output(self, data: bytes) -> None:
        text = data.decode(errors="replace")
        for piece in text.splitlines(keepends=True):
            self.write(("" if self.line_open else "  | ") + piece)
            self.line_open = not piece.endswith("\n")

    def show(self, event: object) -> None:
        if isinstance(event, template_pb2.TemplateBuild):
            self.total = len(event.steps) or self.total
            if not self.announced:
                self.announced = True
                base = f" on {event.base}" if event.base else ""
                steps = f"{self.total} step" + ("" if self.total == 1 else "s")
                self.line(f"building {build_ref(event.name)}{base}: {steps}")
        elif isinstance(event, template_pb2.TemplateBuildStep):
            label = f"[{event.index + 1}/{max(self.total, event.index + 1)}]"
            if event.state == STEP.TEMPLATE_STEP_STATE_RUNNING:
                self.line(f"{label} {event.text}")
            elif event.state == STEP.TEMPLATE_STEP_STATE_CACHED:
                self.line(f"{label} {event.text} (cached)")
            elif event.state == STEP.TEMPLATE_STEP_STATE_DONE:
                self.line(f"{label} done in {seconds(event.duration_ms)}")
            elif event.state == STEP.TEMPLATE_STEP_STATE_FAILED:
                code = f" with exit code {event.exit_code}" if event.exit_code else ""
                self.line(f"{label} failed{code} after {seconds(event.duration_ms)}")
        elif isinstance(event, template_service_pb2.BuildLog):
            self.output(event.data)

    def done(self, build: template_pb2.TemplateBuild) -> None:
        took = ""
        if build.end_time.seconds and build.create_time.seconds:
            took = f" in {seconds(build.end_time.ToMilliseconds() - build.create_time.ToMilliseconds())}"
        tags = ", ".join(build.tags) or "latest"
        self.line(f"built {build_ref(build.name)}{took}; tags: {tags}")


def report_failure(failure: TemplateBuildFailed, log: bytes, total: int, out: TextIO) -> None:
    """`mvm: template build T/B failed at step 2/5 (...)` and the failed step's last output lines."""
    step = failure.failed_step
    where = ""
    if step is not None:
        where = f" at step {step.index + 1}/{max(total, step.index + 1)} ({step.text}"
        where += f", exit code {step.exit_code})" if step.exit_code else ")"
    reason = failure.failure_reason + (f": {failure.failure_message}" if failure.failure_message else "")
    print(f"mvm: template build {build_ref(failure.build.name)} failed{where}: {reason}", file=out)
    lines = log.decode(errors="replace").splitlines()[-LAST_LINES:]
    if lines:
        what = f"step {step.index + 1}" if step is not None and failure.log_tail else "the build"
        print(f"mvm: last output of {what}:", file=out)
        print("\n".join(f"  | {line}" for line in lines), file=out, flush=True)


def follow(ctx: Context, stream, quiet: bool) -> tuple[template_pb2.TemplateBuild, int]:
    """Shows a build's events on stderr (unless quiet) until it ends: (the build, 0) when it succeeded, (the
    build, 1) after reporting the failure when it failed."""
    out = sys.stderr
    printer = BuildPrinter(out)
    progress = BuildProgress()
    try:
        with stream:
            for event in stream:
                progress.add(event)
                if not quiet:
                    printer.show(event)
    except KeyboardInterrupt:
        if stream.build is not None:
            ref = build_ref(stream.build.name)
            print(f"\nmvm: stopped following; the build goes on: mvm template logs {ref} --follow", file=out)
        raise
    try:
        build = progress.result()
    except TemplateBuildFailed as failure:
        log = failure.log_tail or ctx.client.templates.get_build_log(failure.build.name)
        if printer.line_open:
            printer.line("")
        report_failure(failure, log, printer.total or len(failure.build.steps), out)
        return failure.build, 1
    if not quiet:
        printer.done(build)
    return build, 0


def build_command(ctx: Context, args) -> int:
    template = definition(args)
    stream = ctx.client.templates.build_stream(
        template,
        args.name,
        tags=args.tag or (),
        build_args=parse_pairs(args.build_arg, "build arg"),
        no_cache=args.no_cache,
        timeout=args.timeout,
    )
    build, status = follow(ctx, stream, args.quiet)
    emit(to_json(build) if args.json else build_ref(build.name))
    return status
