"""The build context: the directory COPY sources and base archives are read from, and nothing outside it.

Sources are relative POSIX paths (Go-style wildcards `*`, `?`, `[...]` per path segment); absolute ones and
ones that leave the context through `..` are refused, and so is any symlink among what is read whose target
resolves outside the context (absolute targets always do). A named source that is a symlink is followed (as
Docker does); inside a copied directory symlinks are copied as symlinks. Directories are walked in sorted
order without following links; regular files are opened with O_NOFOLLOW and hashed; devices, FIFOs and
sockets are refused, never opened. Everything read counts against `ContextLimits`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from images.definition.errors import (
    CONTEXT_TOO_LARGE,
    COPY_OUTSIDE_CONTEXT,
    COPY_SOURCE_NOT_FOUND,
    SYMLINK_OUTSIDE_CONTEXT,
    UNSUPPORTED_FILE,
    Where,
)
from images.definition.plan import CopyEntry

WILDCARDS = "*?["
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class ContextLimits:
    """Bounds on what one plan reads from its context: bytes of regular files and entries (files,
    directories, symlinks), over all COPY steps and a base archive together."""

    max_bytes: int = 4 << 30
    max_entries: int = 100_000


@dataclass(frozen=True)
class Match:
    """A source as matched: its path relative to the context and the lstat of what it names (followed)."""

    relative: str
    path: Path
    is_dir: bool


class BuildContext:
    def __init__(self, root: Path | str, limits: ContextLimits | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self.limits = limits or ContextLimits()
        self.bytes_read = 0
        self.entries_read = 0
        self._digests: dict[str, tuple[str, int]] = {}

    # -- naming sources

    def normalise(self, source: str, where: Where) -> str:
        """A source as a clean relative POSIX path ("." for the context itself), or COPY_OUTSIDE_CONTEXT."""
        if source.startswith("/"):
            raise where.error(
                COPY_OUTSIDE_CONTEXT, f"source {source!r} is absolute: sources are relative to the build context"
            )
        clean = posixpath.normpath(source) if source else "."
        if clean == ".." or clean.startswith("../"):
            raise where.error(COPY_OUTSIDE_CONTEXT, f"source {source!r} leaves the build context")
        if "\0" in clean:
            raise where.error(UNSUPPORTED_FILE, f"source {source!r} contains a NUL byte")
        try:
            clean.encode("utf-8")
        except UnicodeEncodeError:
            raise where.error(UNSUPPORTED_FILE, f"source {source!r} is not valid UTF-8") from None
        return clean

    def inside(self, path: Path | str) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def resolve(self, source: str, where: Where, *, wildcards: bool = True) -> list[Match]:
        """What a source names, in sorted order for wildcards; COPY_SOURCE_NOT_FOUND when nothing."""
        clean = self.normalise(source, where)
        candidates = self._glob(clean) if wildcards and any(char in clean for char in WILDCARDS) else [clean]
        matches = []
        for relative in candidates:
            path = self.root / relative if relative != "." else self.root
            if not os.path.lexists(path):
                continue
            if not self.inside(path):
                raise where.error(
                    SYMLINK_OUTSIDE_CONTEXT, f"source {relative!r} is (or goes through) a symlink out of the context"
                )
            try:
                info = os.stat(path)
            except OSError:
                continue  # a dangling symlink names nothing, as for Docker
            matches.append(Match(relative, path, stat.S_ISDIR(info.st_mode)))
        if not matches:
            raise where.error(COPY_SOURCE_NOT_FOUND, f"source {source!r} matches nothing in the build context")
        return matches

    def _glob(self, pattern: str) -> list[str]:
        found = ["."]
        for segment in pattern.split("/"):
            following = []
            for parent in found:
                directory = self.root / parent if parent != "." else self.root
                if not any(char in segment for char in WILDCARDS):
                    following.append(segment if parent == "." else f"{parent}/{segment}")
                    continue
                if not directory.is_dir() or not self.inside(directory):
                    continue
                for name in sorted(os.listdir(directory)):
                    if fnmatch.fnmatchcase(name, segment):
                        following.append(name if parent == "." else f"{parent}/{name}")
            found = following
        return found

    # -- reading what a source names

    def entries(self, match: Match, dest: str, where: Where) -> list[CopyEntry]:
        """CopyEntries for a matched source put at `dest` (a file's full destination, or the directory its
        contents go into)."""
        if not match.is_dir:
            return [self._entry(match.path, match.relative, dest, where, follow=True)]
        out: list[CopyEntry] = []
        self._walk(match.path, match.relative, dest, where, out)
        return out

    def _walk(self, directory: Path, relative: str, dest: str, where: Where, out: list[CopyEntry]) -> None:
        """Everything under `directory` in pre-order, each directory's names sorted (iterative: any depth)."""
        stack = [(directory, relative, dest, iter(self._names(directory, relative, where)))]
        while stack:
            directory, relative, dest, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child_relative = name if relative == "." else f"{relative}/{name}"
            child_dest = posixpath.join(dest, name)
            entry = self._entry(directory / name, child_relative, child_dest, where, follow=False)
            out.append(entry)
            if entry.kind == "dir":
                child = directory / name
                stack.append((child, child_relative, child_dest, iter(self._names(child, child_relative, where))))

    @staticmethod
    def _names(directory: Path, relative: str, where: Where) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except OSError as error:
            raise where.error(UNSUPPORTED_FILE, f"cannot read directory {relative!r}: {error.strerror}") from None

    def _count(self, size: int, relative: str, where: Where) -> None:
        self.entries_read += 1
        self.bytes_read += size
        if self.entries_read > self.limits.max_entries:
            raise where.error(
                CONTEXT_TOO_LARGE, f"more than {self.limits.max_entries} files and directories read from the context"
            )
        if self.bytes_read > self.limits.max_bytes:
            raise where.error(
                CONTEXT_TOO_LARGE, f"more than {self.limits.max_bytes} bytes read from the context (at {relative!r})"
            )

    def _entry(self, path: Path, relative: str, dest: str, where: Where, *, follow: bool) -> CopyEntry:
        try:
            os.fsencode(relative).decode("utf-8")
        except UnicodeDecodeError:
            raise where.error(UNSUPPORTED_FILE, f"file name {relative!r} is not UTF-8") from None
        info = os.stat(path) if follow else os.lstat(path)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            if not self.inside(path):
                raise where.error(
                    SYMLINK_OUTSIDE_CONTEXT, f"symlink {relative!r} -> {os.readlink(path)!r} points out of the context"
                )
            target = os.readlink(path)
            self._count(0, relative, where)
            return CopyEntry(relative, dest, "symlink", mode, digest=None, target=target)
        if stat.S_ISDIR(info.st_mode):
            self._count(0, relative, where)
            return CopyEntry(relative, dest, "dir", mode)
        if not stat.S_ISREG(info.st_mode):
            raise where.error(UNSUPPORTED_FILE, f"{relative!r} is not a regular file, directory or symlink")
        self._count(info.st_size, relative, where)
        digest, size = self.file_digest(path, relative, where, follow=follow)
        return CopyEntry(relative, dest, "file", mode, size=size, digest=digest)

    def file_digest(self, path: Path, relative: str, where: Where, *, follow: bool = False) -> tuple[str, int]:
        """sha256 and size of a regular file, read without following a link swapped in (unless `follow`)."""
        if relative in self._digests:
            return self._digests[relative]
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
        try:
            descriptor = os.open(path, flags)
        except OSError as error:
            raise where.error(UNSUPPORTED_FILE, f"cannot read {relative!r}: {error.strerror}") from None
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise where.error(UNSUPPORTED_FILE, f"{relative!r} is not a regular file")
            while chunk := file.read(READ_CHUNK):
                size += len(chunk)
                if size > self.limits.max_bytes:
                    raise where.error(CONTEXT_TOO_LARGE, f"{relative!r} is larger than the context limit")
                digest.update(chunk)
        self._digests[relative] = (digest.hexdigest(), size)
        return self._digests[relative]
