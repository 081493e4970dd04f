"""The image cache: every build stage lives under $MVM_CACHE_DIR/images keyed by the hash of what it is built
from, and is built into a temporary sibling that is renamed only once complete."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MVM_CACHE_DIR") or Path.home() / ".cache" / "microvm") / "images"


def content_hash(*parts: object) -> str:
    """16 hex digits of sha256 over `parts`: a Path by its bytes (a directory by its files' names and bytes,
    __pycache__ left out), anything else by its JSON."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            if part.is_dir():
                for file in sorted(p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
                    digest.update(str(file.relative_to(part)).encode())
                    digest.update(file.read_bytes())
            else:
                digest.update(part.read_bytes())
        else:
            digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def step(message: str) -> None:
    print(f"[images] {time.strftime('%H:%M:%S')} {message}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def stage(directory: Path, build) -> Path:
    """Builds into a temporary sibling and renames, so an interrupted build never looks finished. Builders of the
    same stage in other processes (two templates published at once) wait for the first and take its result."""
    if (directory / ".complete").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / ".complete").exists():
            return directory
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            build(work)
            (work / ".complete").touch()
            if directory.exists():
                shutil.rmtree(directory)
            work.rename(directory)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return directory


def write_pointer(path: Path, text: str) -> None:
    """Replaces the small file `path` (a `current` pointer) at once: a reader sees the old text or the new."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    temporary.rename(path)
