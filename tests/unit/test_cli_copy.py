"""`mvm cp` against an in-process installation (fake VMM): docker cp's rules for files, directories, trailing
slashes and existing targets, both directions, and one-line errors."""

from __future__ import annotations

import asyncio
import os

import pytest

from microvm_sandbox import Client, Sandbox
from mvm_cli.main import run
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def installation(installation):
    caller = await tenant_caller(installation, f"cp-{installation.node}")
    installation.address, installation.key = await installation.address("gateway"), caller.key
    return installation


@pytest.fixture
async def cp(installation, monkeypatch, tmp_path):
    """`cp(SRC, DEST)` runs `mvm cp` (in a thread: the CLI is synchronous) with `@` standing for the sandbox."""
    monkeypatch.setenv("MVM_API_KEY", installation.key)
    client = await asyncio.to_thread(Client, installation.address, installation.key)
    sandbox = await asyncio.to_thread(Sandbox.create, client=client)
    monkeypatch.chdir(tmp_path)

    async def copy(source: str, target: str) -> int:
        argv = [
            "--gateway",
            installation.address,
            "cp",
            source.replace("@", sandbox.id),
            target.replace("@", sandbox.id),
        ]
        return await asyncio.to_thread(run, argv)

    copy.files = sandbox.files
    yield copy
    await asyncio.to_thread(sandbox.kill)
    await asyncio.to_thread(client.close)


def tree(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(base, name), root): open(os.path.join(base, name), "rb").read()
        for base, _, names in os.walk(root)
        for name in names
    }


async def test_files_go_in_by_docker_cp_rules(cp, tmp_path):
    (tmp_path / "a.txt").write_text("A")
    big = os.urandom(9 << 20)
    (tmp_path / "big.bin").write_bytes(big)
    await asyncio.to_thread(cp.files.make_dir, "/srv/in")
    assert await cp("a.txt", "@:/srv/in") == 0  # an existing directory: into it
    assert await cp("big.bin", "@:/srv/in/") == 0  # 9 MiB into a directory (answered INTERNAL before)
    assert await cp("a.txt", "@:/srv/in/renamed.txt") == 0  # a new path: that file
    assert await cp("a.txt", "@:/srv/in/renamed.txt") == 0  # an existing file: replaced
    names = sorted(e.name for e in await asyncio.to_thread(cp.files.list, "/srv/in"))
    assert names == ["a.txt", "big.bin", "renamed.txt"]
    assert await asyncio.to_thread(cp.files.read, "/srv/in/big.bin") == big


async def test_directories_go_in_by_docker_cp_rules(cp, tmp_path):
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "sub" / "f").write_text("f")
    (tmp_path / "proj" / "g").write_text("g")
    await asyncio.to_thread(cp.files.make_dir, "/srv/have")
    assert await cp("proj", "@:/srv/new") == 0  # missing: becomes it
    assert await cp("proj", "@:/srv/have") == 0  # existing: under its own name
    assert await cp("proj/.", "@:/srv/have") == 0  # `/.`: its contents
    listed = {e.path for e in await asyncio.to_thread(cp.files.list, "/srv", depth=4)}
    assert {"/srv/new/sub/f", "/srv/new/g", "/srv/have/proj/sub/f", "/srv/have/g", "/srv/have/sub/f"} <= listed


async def test_files_and_directories_come_out_by_docker_cp_rules(cp, tmp_path):
    await asyncio.to_thread(cp.files.write_many, {"/data/d/x": "x", "/data/d/y/z": "z", "/data/file": "F"})
    (tmp_path / "out").mkdir()
    assert await cp("@:/data/file", "out") == 0
    assert await cp("@:/data/file", "copy.txt") == 0
    assert await cp("@:/data/d", "fresh") == 0
    assert await cp("@:/data/d", "out") == 0
    assert await cp("@:/data/d/.", "out") == 0
    assert (tmp_path / "out" / "file").read_text() == "F" and (tmp_path / "copy.txt").read_text() == "F"
    assert tree(tmp_path / "fresh") == {"x": b"x", "y/z": b"z"}
    assert tree(tmp_path / "out") == {"file": b"F", "d/x": b"x", "d/y/z": b"z", "x": b"x", "y/z": b"z"}


@pytest.mark.parametrize(
    "source,target,words",
    [
        ("a.txt", "@:/srv/missing/", "does not exist"),
        ("proj", "@:/etc/hostname", "onto the file"),
        ("a.txt/", "@:/srv", "not a directory"),
        ("nothing-here", "@:/srv", "no such file"),
        ("@:/no/such", "out", "NOT_FOUND"),
        ("@:/etc", "a.txt", "onto the file"),
        ("a.txt", "b.txt", "exactly one"),
    ],
)
async def test_mistakes_are_one_line_errors(cp, tmp_path, capfd, source, target, words):
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "proj").mkdir()
    await asyncio.to_thread(cp.files.write, "/etc/hostname", "h")
    await asyncio.to_thread(cp.files.make_dir, "/srv")
    status = await cp(source, target)
    err = capfd.readouterr().err.strip().splitlines()
    assert status in (1, 2) and len(err) == 1 and err[0].startswith("mvm: ") and words in err[0], err
