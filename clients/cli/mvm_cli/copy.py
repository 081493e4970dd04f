"""`mvm cp SRC DEST`: files and directories into and out of a sandbox, streamed, with docker cp's rules.

One side is `ID:/absolute/path`, the other a local path (or `-`: the file's bytes on stdin or stdout).
- A file onto a directory lands in it under its own name; onto a file or a missing path, it becomes that path;
  onto a missing path ending in `/`, an error (the directory must exist).
- A directory onto a missing path becomes that path (its contents copied there); into an existing directory it
  goes under its own name, or, when SRC ends in `/.`, its contents go into the directory; onto a file, an error.
- A SRC ending in `/` must be a directory.
Directories travel as one tar stream (UploadArchive/DownloadArchive); nothing is held whole on either side. A
progress bar goes to stderr when it is a terminal. Errors are one line (`mvm: ...`).
"""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from microvm_sandbox import NotFoundError
from microvm_sandbox.transfer import add_path, tar_chunks, untar_into
from mvm_cli.context import Context
from mvm_cli.output import short
from mvm_cli.parsing import CliError, command_parser

EXAMPLE = """mvm cp ./project sbx-1a2b3c:/root/            # the directory goes to /root/project
mvm cp ./project/. sbx-1a2b3c:/root/app       # its contents go into /root/app
mvm cp sbx-1a2b3c:/var/log/app.log .          # a file out, into the current directory"""


def register(sub) -> None:
    """The `cp` command (main.py calls this)."""
    cp = command_parser(
        sub,
        "cp",
        "copy files or directories into or out of a sandbox (ID:/path on one side)",
        EXAMPLE,
        description=__doc__.split("\n", 2)[2].strip(),
    )
    cp.add_argument("source", metavar="SRC", help="local path, `-` (stdin) or ID:/path")
    cp.add_argument("target", metavar="DEST", help="local path, `-` (stdout) or ID:/path")
    cp.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    cp.set_defaults(handler=run_copy)


def remote(spec: str) -> tuple[str, str] | None:
    """(sandbox id, path) of `ID:/path`, None for a local path."""
    sandbox, sep, path = spec.partition(":")
    return (sandbox, path) if sep and path.startswith("/") and sandbox and "/" not in sandbox else None


class Progress:
    """`12.0 MiB / 1.0 GiB  85.1 MiB/s` on stderr, redrawn at most ten times a second; silent off a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.done, self.started, self.drawn = 0, time.monotonic(), 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and now - self.drawn >= 0.1:
            self.drawn = now
            self.draw(now)

    def draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-6)
        total = f" / {size(self.total)}" if self.total else ""
        share = f" {100 * self.done // self.total:3d}%" if self.total else ""
        sys.stderr.write(f"\r{self.label}{share}  {size(self.done)}{total}  {size(rate)}/s\x1b[K")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.draw(time.monotonic())
            sys.stderr.write("\n")


def size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


async def counted(chunks: AsyncIterator[bytes], progress: Progress) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        progress.add(len(chunk))
        yield chunk


class CountingReader:
    """A local file read by the SDK (in a worker thread), counting for the progress bar."""

    def __init__(self, handle, progress: Progress) -> None:
        self.handle, self.progress = handle, progress

    def read(self, count: int = -1) -> bytes:
        data = self.handle.read(count)
        self.progress.add(len(data))
        return data


def run_copy(ctx: Context, args) -> int:
    source, target = remote(args.source), remote(args.target)
    if bool(source) == bool(target):
        raise CliError("exactly one of SRC and DEST must be ID:/absolute/path")
    if target:
        return upload(ctx, args.source, target, not args.no_progress)
    return download(ctx, source, args.target, not args.no_progress)


def upload(ctx: Context, local: str, to: tuple[str, str], progress: bool) -> int:
    sandbox_id, path = to
    sandbox = ctx.sandbox_by_name(sandbox_id)
    files = sandbox.files
    where = f"{short(sandbox.name)}:{path}"
    try:
        existing = files.stat(path)
    except NotFoundError:
        existing = None
    if local == "-":
        if existing is not None and existing.is_dir:
            raise CliError(f"{where} is a directory: name the file to write from stdin")
        files.write(path, sys.stdin.buffer)
        return 0
    source = Path(local)
    if not os.path.lexists(source):
        raise CliError(f"{local}: no such file or directory")
    if path.endswith("/") and existing is None:
        raise CliError(f"{where}: the destination directory does not exist")
    if not source.is_dir():
        if local.endswith("/"):
            raise CliError(f"{local}: not a directory")
        destination = posixpath.join(path, source.name) if existing is not None and existing.is_dir else path
        bar = Progress(f"{source.name} -> {short(sandbox.name)}", os.path.getsize(source), progress)
        with open(source, "rb") as handle:
            files.write(destination, CountingReader(handle, bar), mode=os.stat(source).st_mode & 0o7777)
        bar.finish()
        return 0
    if existing is not None and not existing.is_dir:
        raise CliError(f"cannot copy a directory onto the file {where}")
    contents_only = local.endswith("/.") or existing is None
    destination = path if contents_only else posixpath.join(path, source.resolve().name)
    total = sum(f.stat().st_size for f in source.rglob("*") if f.is_file() and not f.is_symlink())
    bar = Progress(f"{source.resolve().name}/ -> {short(sandbox.name)}", total, progress)

    def fill(tar) -> None:
        for entry in sorted(os.listdir(source)):
            add_path(tar, source / entry, entry)

    files.run(files.aio.upload_archive(destination, counted(tar_chunks(fill), bar)))
    bar.finish()
    return 0


def download(ctx: Context, origin: tuple[str, str], local: str, progress: bool) -> int:
    sandbox_id, path = origin
    sandbox = ctx.sandbox_by_name(sandbox_id)
    files = sandbox.files
    info = files.stat(path)  # NotFoundError names what is missing
    name = posixpath.basename(posixpath.normpath(path))
    if local == "-":
        if info.is_dir:
            raise CliError(f"{short(sandbox.name)}:{path} is a directory: copy it to a local path")
        for chunk in files.read_stream(path):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return 0
    target = Path(local)
    if not info.is_dir:
        if path.endswith("/"):
            raise CliError(f"{short(sandbox.name)}:{path}: not a directory")
        if local.endswith("/") and not target.is_dir():
            raise CliError(f"{local}: the destination directory does not exist")
        destination = target / name if target.is_dir() else target
        bar = Progress(f"{short(sandbox.name)}:{name} ->", info.size, progress)
        partial = destination.with_name(f".{destination.name}.mvm-part")
        try:
            with open(partial, "wb") as handle:
                for chunk in files.read_stream(path):
                    handle.write(chunk)
                    bar.add(len(chunk))
            os.replace(partial, destination)
        finally:
            if partial.exists():
                partial.unlink()
        bar.finish()
        return 0
    if target.exists() and not target.is_dir():
        raise CliError(f"cannot copy a directory onto the file {local}")
    contents_only = path.endswith("/.") or not target.exists()
    bar = Progress(f"{short(sandbox.name)}:{name}/ ->", None, progress)
    chunks = counted(files.aio.download_archive(path), bar)
    files.run(untar_into(chunks, target, strip=1 if contents_only else 0))
    bar.finish()
    return 0
