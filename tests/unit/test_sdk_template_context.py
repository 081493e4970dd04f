"""The build context as the SDK packs it (microvm_sandbox.template_context): what an ignore file keeps out and lets
back in, entries keeping their kind (symlinks stay symlinks, a FIFO is never opened), owners sent as root, chunks
of at most 1 MiB that make one valid tar stream, and files given inline."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from microvm_sandbox import InvalidArgumentError
from microvm_sandbox.template_context import IgnoreRules, context_chunks, context_paths

pytestmark = pytest.mark.timeout(60)


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


async def pack(context) -> tuple[list[int], dict[str, tarfile.TarInfo], tarfile.TarFile]:
    chunks = [chunk async for chunk in context_chunks(context)]
    tar = tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:")
    return [len(chunk) for chunk in chunks], {m.name: m for m in tar.getmembers()}, tar


@pytest.mark.parametrize(
    "rules, path, excluded",
    [
        (["*.log"], "x.log", True),
        (["*.log"], "sub/x.log", False),  # Docker's rule: patterns are relative to the context's root
        (["**/*.log"], "sub/deep/x.log", True),
        (["**/*.log"], "x.log", True),
        (["build"], "build/out/a.o", True),  # a directory excludes what is under it
        (["/build/"], "build", True),
        (["./docs/*.md"], "docs/a.md", True),
        (["docs/?.md"], "docs/ab.md", False),
        (["[ab].txt"], "b.txt", True),
        (["[!ab].txt"], "b.txt", False),
        (["*.log", "!keep.log"], "keep.log", False),
        (["!keep.log", "*.log"], "keep.log", True),  # the last pattern that matches decides
        (["# comment", "", "  spaced.txt  "], "spaced.txt", True),
        (["node_modules/**"], "node_modules/x/y.js", True),
        (["a*"], "a/b", True),
        (["a*"], "ba", False),
    ],
)
def test_ignore_patterns_follow_dockers_rules(rules, path, excluded):
    assert IgnoreRules(rules).excluded(path) is excluded


def test_dockerignore_keeps_paths_out_and_lets_exceptions_back_in(tmp_path):
    write(
        tmp_path,
        {
            ".dockerignore": "*.log\n!keep.log\nsecret\n!secret/public.txt\n**/__pycache__\n",
            "app.py": "",
            "debug.log": "",
            "keep.log": "",
            "secret/private.key": "",
            "secret/public.txt": "",
            "pkg/__pycache__/m.pyc": "",
            "pkg/m.py": "",
        },
    )
    assert context_paths(tmp_path) == [
        ".dockerignore",
        "app.py",
        "keep.log",
        "pkg",
        "pkg/m.py",
        "secret",  # excluded, but sent to hold what is let back in
        "secret/public.txt",
    ]


def test_mvmignore_wins_over_dockerignore(tmp_path):
    write(tmp_path, {".mvmignore": "b.txt\n", ".dockerignore": "a.txt\n", "a.txt": "", "b.txt": ""})
    assert context_paths(tmp_path) == [".dockerignore", ".mvmignore", "a.txt"]


async def test_entries_keep_their_kind_and_owners_are_root(tmp_path):
    write(tmp_path, {"dir/file.txt": "hello", "script.sh": "#!/bin/sh\n"})
    os.chmod(tmp_path / "script.sh", 0o755)
    os.symlink("dir/file.txt", tmp_path / "link")
    os.symlink("/etc/passwd", tmp_path / "absolute")  # never followed: the builder judges where it points
    os.symlink("dir", tmp_path / "dirlink")  # not walked into
    os.symlink("nowhere", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")  # opening it would block: it is sent as an entry, never opened
    _, members, tar = await pack(tmp_path)
    assert sorted(members) == ["absolute", "dangling", "dir", "dir/file.txt", "dirlink", "fifo", "link", "script.sh"]
    assert members["link"].issym() and members["link"].linkname == "dir/file.txt"
    assert members["absolute"].issym() and members["absolute"].linkname == "/etc/passwd"
    assert members["dirlink"].issym() and members["dangling"].issym()
    assert members["fifo"].isfifo() and members["dir"].isdir()
    assert members["script.sh"].mode & 0o777 == 0o755
    assert tar.extractfile("dir/file.txt").read() == b"hello"
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}


async def test_chunks_are_at_most_one_mebibyte_and_make_one_tar_stream(tmp_path):
    big = os.urandom((5 << 20) // 2)
    (tmp_path / "big.bin").write_bytes(big)
    write(tmp_path, {"small.txt": "s"})
    sizes, members, tar = await pack(tmp_path)
    assert max(sizes) <= 1 << 20 and len(sizes) >= 3
    assert tar.extractfile("big.bin").read() == big and tar.extractfile("small.txt").read() == b"s"


async def test_inline_files_become_a_context_with_their_directories():
    sizes, members, tar = await pack({"app/main.py": "print(1)", "data.bin": b"\x00\x01", "./conf.toml": "x"})
    assert list(members) == ["app", "app/main.py", "conf.toml", "data.bin"]
    assert members["app"].isdir() and tar.extractfile("app/main.py").read() == b"print(1)"
    assert tar.extractfile("data.bin").read() == b"\x00\x01"
    for bad in ("../escape", "/etc/passwd", "."):
        with pytest.raises(InvalidArgumentError):
            await pack({bad: "x"})


def test_a_context_that_is_not_a_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        context_paths(tmp_path / "file")
