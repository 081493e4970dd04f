"""A template build's context, packed on the client into the tar stream BuildTemplate takes (1 MiB messages).

A directory is sent whole except what its ignore file excludes: `.mvmignore` if there is one, else
`.dockerignore`. The rules, a subset of Docker's:

- one pattern a line; blank lines and lines starting with `#` are skipped; a line starting with `!` re-includes
  what an earlier line excluded; the last line that matches a path decides;
- patterns are relative to the context (a leading `/` or `./` changes nothing) and match whole path segments:
  `*` any characters but `/`, `?` one of them, `[...]` one of a set, `**` any number of directories
  (`**/*.pyc`, `build/**`); a pattern that matches a directory excludes everything under it.

Entries keep their kind: directories, regular files (opened with O_NOFOLLOW), symlinks as symlinks (never
followed: the builder decides whether they stay in the context), hard links as links; devices and FIFOs are sent
as entries without content (never opened), sockets left out. Owners are sent as root (they are not part of a
template's cache keys), modes and modification times as they are. Inline files ({path: bytes or str}) become
regular files (mode 0644) in directories made for them (0755).
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path

from microvm_sandbox.errors import InvalidArgumentError
from microvm_sandbox.transfer import add_bytes, tar_chunks

IGNORE_FILES = (".mvmignore", ".dockerignore")


def _glob(pattern: str) -> str:
    """The regular expression of one ignore pattern (already cleaned)."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            index += 2
            if pattern.startswith("/", index):
                out.append("(?:.*/)?")
                index += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[index + 2 :]:
            end = pattern.index("]", index + 2)
            body = pattern[index + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body[0] in "!^" else body) + "]")
            index = end + 1
            continue
        elif char == "\\" and index + 1 < len(pattern):
            out.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out) + "(?:/.*)?"


class IgnoreRules:
    """The patterns of an ignore file, in order: `excluded(path)` for a context-relative path (`a/b.txt`)."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            negated = text.startswith("!")
            text = posixpath.normpath(text[1:].strip() if negated else text).lstrip("/")
            if text in ("", ".", "..") or text.startswith("../"):
                continue
            try:
                self.rules.append((negated, re.compile(_glob(text))))
            except re.error:
                raise InvalidArgumentError(f"ignore pattern {line.strip()!r} is not valid") from None

    @classmethod
    def of_directory(cls, root: Path) -> IgnoreRules:
        """The rules of `root`'s `.mvmignore`, else its `.dockerignore`, else none."""
        for name in IGNORE_FILES:
            path = root / name
            if path.is_file():
                return cls(path.read_text(encoding="utf-8", errors="replace").splitlines())
        return cls()

    @property
    def has_exceptions(self) -> bool:
        """Some `!` pattern may bring back part of an excluded directory."""
        return any(negated for negated, _ in self.rules)

    def excluded(self, path: str) -> bool:
        result = False
        for negated, rule in self.rules:
            if rule.fullmatch(path):
                result = not negated
        return result


def context_paths(root: Path | str, rules: IgnoreRules | None = None) -> list[str]:
    """The context-relative paths a directory's context sends, in the order sent (each directory's entries by
    name, a directory before what it holds). A directory that is excluded is still sent when something under it
    is re-included."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgumentError(f"the build context {str(root)!r} is not a directory")
    rules = rules if rules is not None else IgnoreRules.of_directory(root)
    found: list[str] = []

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            ordered = sorted(entries, key=lambda entry: entry.name)
        for entry in ordered:
            path = prefix + entry.name
            excluded = rules.excluded(path)
            if entry.is_dir(follow_symlinks=False):
                if excluded and not rules.has_exceptions:
                    continue
                mark = len(found)
                walk(entry.path, path + "/")
                if not excluded or len(found) > mark:
                    found.insert(mark, path)
            elif not excluded:
                found.append(path)

    walk(str(root), "")
    return found


def _add_directory(tar: tarfile.TarFile, root: Path, paths: list[str]) -> None:
    for path in paths:
        full = os.path.join(root, path)
        info = tar.gettarinfo(full, arcname=path)
        if info is None:  # a socket
            continue
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if info.isreg():
            with os.fdopen(os.open(full, os.O_RDONLY | os.O_NOFOLLOW), "rb") as file:
                tar.addfile(info, file)
        else:
            tar.addfile(info)


def _clean_name(name: str) -> str:
    clean = posixpath.normpath(name)
    if name.startswith("/") or clean in (".", "..") or clean.startswith("../"):
        raise InvalidArgumentError(f"inline context file {name!r}: give a relative path inside the context")
    return clean


def _add_files(tar: tarfile.TarFile, files: Mapping[str, bytes | str]) -> None:
    made: set[str] = set()
    for name, data in sorted((_clean_name(name), data) for name, data in files.items()):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                made.add(directory)
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
        add_bytes(tar, name, data.encode() if isinstance(data, str) else bytes(data))


async def context_chunks(context: Path | Mapping[str, bytes | str]) -> AsyncGenerator[bytes, None]:
    """The context as a tar stream in chunks of at most 1 MiB, made in a worker thread while they are sent (a
    context of any size holds a few chunks in memory)."""
    if isinstance(context, Mapping):
        files = dict(context)

        def fill(tar: tarfile.TarFile) -> None:
            _add_files(tar, files)

    else:
        root = Path(context)

        def fill(tar: tarfile.TarFile) -> None:
            _add_directory(tar, root, context_paths(root))

    async for chunk in tar_chunks(fill):
        yield chunk
